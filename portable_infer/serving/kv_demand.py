"""KV blocks on demand where the KV is paged, and preemption when the budget runs short.

A paged pool holds each row's KV in the blocks it fills, so a request does not need the blocks
of its whole ``max_new_tokens`` up front (most requests end long before it; an OpenAI client
that omits ``max_tokens`` may be given the whole context). As vLLM's scheduler does::

    admit      the blocks of its prompt and first token, while ``watermark`` blocks stay free
               for the running rows (the planner's rule; none kept when nothing runs)
    each step  a live row whose next token starts a block takes one block more (make_room)
    short      the newest request (by arrival) among the running and prefilling ones is
               preempted until the rest fit: its blocks go back, it waits at the head of the
               queue, and its next turn prefills its prompt and the tokens it had generated
               (recompute; prefix blocks still indexed make that cheap) before it goes on

The oldest request always gets its blocks (the check at submission refuses a request whose
prompt and ``max_new_tokens`` exceed the whole budget), so every request ends. Greedy and seeded
rows give the same tokens with or without preemption. Loop thread only.
"""

from __future__ import annotations

import math

WATERMARK = 0.01  # of the budget's blocks, kept free at admission while requests run (vLLM's default)


def admission_blocks(pool, tokens: int) -> int:
    """Blocks a request of ``tokens`` prefill tokens takes when it is admitted: those and its first token's."""
    return pool.blocks_for(tokens + 1)


def watermark(pool) -> int:
    return math.ceil(WATERMARK * pool.total)


def make_room(batch, queues) -> None:
    """Before a step: the blocks each live row of ``batch`` needs for its next token, reserved in
    ``queues``' pool; where they are not free, newer requests preempted until they are."""
    extra = _extra(batch, queues.pool)
    if not extra:
        return
    with queues.lock:
        if sum(extra.values()) <= queues.pool.free:
            _grow(queues, extra)
            return
    queues.hand_over(batch.flush())  # tokens in flight first: one may end its row (its blocks come back)
    with queues.lock:
        extra = _extra(batch, queues.pool)
        candidates = [r for r in (*batch.rows, *queues.prefilling) if r.state in ("running", "prefilling")]
        preempted = []
        for r in sorted(candidates, key=lambda r: r.submitted, reverse=True):
            if sum(extra.values()) <= queues.pool.free:
                break
            queues.preempt(r)
            extra.pop(r, None)
            preempted.append(r.id)
        if sum(extra.values()) > queues.pool.free:  # the oldest fits the budget alone: a bug
            raise RuntimeError(f"KV blocks: {sum(extra.values())} needed, {queues.pool.free} free after preempting "
                               f"{len(preempted)} requests")
        _grow(queues, extra)
    batch.leave(preempted)  # their KV goes
    batch.forget(preempted)


def _extra(batch, pool) -> dict:
    """{request: blocks more than it holds} for the live rows whose next token needs them."""
    need = ((r, pool.blocks_for(tokens) - r.blocks) for r, tokens in batch.kv_after_step())
    return {r: more for r, more in need if more > 0}


def _grow(queues, extra: dict) -> None:
    for r, n in extra.items():
        queues.grow(r, n)

"""The scheduler's planner: queues and budgets in, a plain-data plan for one step out.

::

    waiting ──── admit: FIFO, while a slot (max_batch) and the KV blocks of the head are free
                 (and, while requests run, ``watermark`` blocks more: paged KV's rows grow)
    prefilling ─ drop the ones that ended (cancelled, failed) while they waited
       │ first look: a cached prompt prefix of >= prefix_min tokens is reused now, a shorter
       │             one is kept for a prefill alone
       └ prefill: prompts of <= one chunk each from the head on, <= 4 chunks in all, in one
                  left-padded forward (a group); else the head alone, <= prefill_chunk tokens
    running rows ─ leave: finished rows (kept, masked, on fixed buffers off the CPU until
                  half the batch has finished or a request joins) ─ decode: any row left?

The planner calls no model and touches no cache. It reads requests through :class:`PlanRequest`
(ids, lengths, state) and the prefix cache through a side-effect-free ``cached_prefix``
function, and returns a frozen :class:`StepPlan`. The loop (:mod:`portable_infer.serving.scheduler`)
applies the plan's bookkeeping under its lock and hands the rest to the running batch
(:mod:`portable_infer.serving.running_batch`), as vLLM v1's scheduler emits a plain ``SchedulerOutput``
that a model runner executes.

Example::

    planner = Planner(max_batch=8, prefill_chunk=128, max_context=2048)
    plan = planner.plan(QueueView(waiting, prefilling, rows, active=3, free_blocks=40), lambda r: 0)
    plan.prefill.slices   # (PrefillSlice("req-4", 0, 37, last=True), ...)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

GROUP_CHUNKS = 4  # a grouped prefill holds at most this many chunks of prompt tokens


def kv_need(rows: Sequence, max_context: int) -> int:
    """KV tokens requests ``rows`` may need: their longest prompt + max_new_tokens, within the context."""
    return min(max_context, max(r.prompt_len + r.max_new_tokens for r in rows))


class PlanRequest(Protocol):
    """What the planner reads of a request (the scheduler's :class:`~portable_infer.serving.request.Request`)."""

    id: str
    state: str  # "waiting" | "prefilling" | "running" | "done"
    blocks: int  # KV blocks it reserves at admission (paged KV: its prompt's; more as it runs)
    prefilled: int  # prompt tokens whose KV is computed (or taken from the prefix cache)
    prefix_checked: bool  # looked up in the prefix cache already
    alone: bool  # to be prefilled by itself (a grouped prefill with it failed)
    short_prefix: int  # cached prefix tokens it reuses only if it is prefilled alone

    @property
    def prompt_len(self) -> int: ...  # tokens its prefill computes (a preempted request's: its output too)

    @property
    def max_new_tokens(self) -> int: ...  # tokens it may still generate after that


@dataclass(frozen=True)
class QueueView:
    """What the planner sees of the scheduler at one instant (read under its lock)."""

    waiting: Sequence  # [PlanRequest] not admitted yet, oldest first
    prefilling: Sequence  # [PlanRequest] admitted, prompt not done, oldest first
    rows: Sequence  # [PlanRequest] of the running batch, in row order
    active: int  # admitted and not done (prefilling + running)
    free_blocks: int  # KV blocks not reserved


@dataclass(frozen=True)
class FromPrefix:
    """Start ``request`` from a copy of the cached KV of its first ``tokens`` prompt tokens, in a
    batch-1 cache with room for ``capacity`` tokens."""

    request: str
    tokens: int
    capacity: int


@dataclass(frozen=True)
class PrefillSlice:
    """Prompt tokens ``[start, end)`` of ``request`` in this step's prefill forward; ``last``:
    its prompt is done, its first token is sampled and it joins the running batch."""

    request: str
    start: int
    end: int
    last: bool


@dataclass(frozen=True)
class Prefill:
    """One prefill forward: several whole prompts left-padded together (``grouped``; if that
    forward fails each is prefilled alone later), or one chunk of one prompt."""

    slices: tuple  # (PrefillSlice, ...)
    capacity: int  # KV tokens its rows may need (fixed-size caches are allocated for it)
    grouped: bool

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def tokens(self) -> int:
        return sum(s.end - s.start for s in self.slices)

    @property
    def joins(self) -> bool:
        """Whether a prompt ends in this forward (its row joins the batch)."""
        return any(s.last for s in self.slices)


@dataclass(frozen=True)
class StepPlan:
    """What one step of the loop does, in this order (all plain data: request ids and counts)."""

    admit: tuple = ()  # waiting requests admitted now, in queue order
    drop: tuple = ()  # prefilling requests that already ended: out of the queue, KV dropped
    checked: tuple = ()  # looked up in the prefix cache for the first time
    short_prefix: tuple = ()  # ((request, tokens), ...): the hit it reuses only alone (0: none)
    from_prefix: tuple = ()  # (FromPrefix, ...) before the prefill
    prefill: Prefill | None = None
    leave: tuple = ()  # finished rows sliced out of the running batch before the forwards
    decode: bool = False  # one forward for the batch, one token per live row

    @property
    def idle(self) -> bool:
        return not (self.admit or self.drop or self.from_prefix or self.leave or self.decode) \
            and self.prefill is None


@dataclass(frozen=True)
class Planner:
    """The scheduling rules (validated sizes come from :class:`SchedulerConfig`).

    Args:
        max_batch: slots (requests admitted and not done).
        prefill_chunk: prompt tokens one request prefills per step; a group's prompts are each
            at most this long and together at most ``GROUP_CHUNKS`` times it.
        max_context: the model's context (caps a request's KV capacity).
        prefix_min: a request that can be prefilled in a group reuses a cached prefix only from
            this many tokens on (a request prefilled alone reuses any).
        prefix_cache: whether prefixes are cached at all.
        defer_leave: finished rows stay in the batch (masked) until half of it has finished or
            a request joins (fixed KV buffers off the CPU).
        watermark: KV blocks admission leaves free while any request is admitted (paged KV,
            where running rows take blocks as they grow: :mod:`~portable_infer.serving.kv_demand`).
    """

    max_batch: int
    prefill_chunk: int
    max_context: int
    prefix_min: int = 0
    prefix_cache: bool = True
    defer_leave: bool = False
    watermark: int = 0

    def admit(self, waiting: Sequence, active: int, free_blocks: int) -> tuple:
        """Ids of the waiting requests to admit: from the head on, while a slot and the head's
        KV blocks are free (``watermark`` more while any request is admitted). FIFO: a large
        request at the head is not overtaken by smaller ones behind it, so it is never starved."""
        out = []
        for r in waiting:
            busy = active + len(out)
            if busy >= self.max_batch or r.blocks > free_blocks - (self.watermark if busy else 0):
                break
            out.append(r.id)
            free_blocks -= r.blocks
        return tuple(out)

    def capacity(self, rows: Sequence) -> int:
        """KV tokens ``rows`` may need (:func:`kv_need`)."""
        return kv_need(rows, self.max_context)

    def plan(self, q: QueueView, cached_prefix: Callable[[PlanRequest], int]) -> StepPlan:
        """The next step's :class:`StepPlan`. ``cached_prefix(r)``: how many of ``r``'s prompt
        tokens the prefix cache could give now (no side effects; called for requests seen for
        the first time, and for a head about to be prefilled alone with a short hit)."""
        admit = self.admit(q.waiting, q.active, q.free_blocks)
        queue = [*q.prefilling, *islice(q.waiting, len(admit))]
        drop = tuple(r.id for r in queue if r.state == "done")
        queue = [r for r in queue if r.state != "done"]
        prefilled = {r.id: r.prefilled for r in queue}
        checked, short, starts = self._first_looks(queue, prefilled, cached_prefix)
        prefill = self._prefill(queue, prefilled, short, starts, cached_prefix)
        leave, decode = self._leave(q.rows, prefill is not None and prefill.joins)
        was = {r.id: r.short_prefix for r in queue}
        notes = tuple((i, n) for i, n in short.items() if n != was[i])
        return StepPlan(admit, drop, checked, notes, tuple(starts), prefill, leave, decode)

    def _first_looks(self, queue: list, prefilled: dict, cached_prefix) -> tuple:
        """Requests seen for the first time: a cached prefix of at least ``prefix_min`` tokens is
        reused now; a shorter hit is noted (reused only if the request is prefilled alone)."""
        checked, short, starts = [], {r.id: r.short_prefix for r in queue}, []
        for r in queue:
            if r.prefix_checked:
                continue
            checked.append(r.id)
            if r.prefilled or not self.prefix_cache:
                continue
            n = cached_prefix(r)
            if n and n >= self.prefix_min:
                starts.append(FromPrefix(r.id, n, self.capacity([r])))
                prefilled[r.id], short[r.id] = n, 0
            else:
                short[r.id] = n
        return tuple(checked), short, starts

    def _prefill(self, queue: list, prefilled: dict, short: dict, starts: list, cached_prefix) -> Prefill | None:
        """Several whole prompts from the head on in one forward, or a chunk of the head alone."""
        group, tokens = [], 0
        for r in queue:
            n = r.prompt_len
            if prefilled[r.id] or r.alone or n > self.prefill_chunk or tokens + n > GROUP_CHUNKS * self.prefill_chunk:
                break
            group.append(r)
            tokens += n
        if len(group) > 1:
            slices = tuple(PrefillSlice(r.id, 0, r.prompt_len, True) for r in group)
            return Prefill(slices, self.capacity(group), grouped=True)
        if not queue:
            return None
        head = queue[0]
        if short[head.id]:  # alone after all: its short cached prefix saves work now
            n = cached_prefix(head)
            short[head.id] = 0
            if n:
                starts.append(FromPrefix(head.id, n, self.capacity([head])))
                prefilled[head.id] = n
        start = prefilled[head.id]
        end = min(start + self.prefill_chunk, head.prompt_len)
        return Prefill((PrefillSlice(head.id, start, end, end == head.prompt_len),), self.capacity([head]),
                       grouped=False)

    def _leave(self, rows: Sequence, joins: bool) -> tuple:
        """``(leave, decode)``: the finished rows that leave the batch now, and whether a decode
        forward runs (rows are left, or one joins in this step)."""
        done = tuple(r.id for r in rows if r.state == "done")
        keep = len(rows) - len(done)
        if done and self.defer_leave and not joins and keep and 2 * keep > len(rows):
            done = ()  # they wait, masked: see Planner's defer_leave
        return done, bool(keep) or joins

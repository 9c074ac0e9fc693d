"""The decode loop, on token ids: prefill, then one token per step reusing the KV cache.

:class:`BatchDecoder` runs any number of sequences in lock step (left-padded into one batch).
Each :meth:`BatchDecoder.step` samples one token for every running sequence (the per-token rule
of :class:`~portable_infer.decode.sequence.Sequence`); the forward pass for those tokens runs lazily at
the start of the next step, so a caller that stops a sequence in between (a stop string, a
cancelled stream) never pays for a wasted step. The grammar masks of constrained rows are filled
together, while that forward pass runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from portable_infer.decode import batch_pick
from portable_infer.decode.masks import MaskFill
from portable_infer.errors import ContextLengthError, InvalidArgumentError
from portable_infer.decode.sequence import Sequence

# batch_generate's sub-batch size: rows x min(context, longest prompt + max_new_tokens) KV tokens
# at most (~375 MB of fp32 KV for SmolLM2-135M). One padded batch of every prompt grew without
# bound: 200 prompts of 1-345 tokens peaked at 7.7 GB.
DEFAULT_BATCH_TOKENS = 8192


@dataclass(frozen=True)
class StepToken:
    row: int
    token: int
    finish_reason: str | None  # None while running; "stop" | "length"
    logprob: float | None = None
    top_logprobs: tuple = ()


def check_prompt(ids: list, max_context: int, truncate: bool) -> list:
    """A prompt that fits the context (at least one token left to generate), or an error."""
    if not ids:
        raise InvalidArgumentError("the prompt is empty: give at least one token")
    if len(ids) < max_context:
        return list(ids)
    if truncate:
        return list(ids[-(max_context - 1):])
    raise ContextLengthError(
        f"the prompt has {len(ids)} tokens but the model's context is {max_context} (at least one "
        f"must be left to generate); shorten the prompt or pass truncate=True to keep its last "
        f"{max_context - 1} tokens")


def check_batch_tokens(max_batch_tokens) -> int:
    """``max_batch_tokens`` (None: :data:`DEFAULT_BATCH_TOKENS`) checked to be an int >= 1."""
    if max_batch_tokens is None:
        return DEFAULT_BATCH_TOKENS
    if not isinstance(max_batch_tokens, int) or isinstance(max_batch_tokens, bool) or max_batch_tokens < 1:
        raise InvalidArgumentError(f"max_batch_tokens must be an int >= 1 (KV tokens per sub-batch: rows x "
                                   f"(longest prompt + max_new_tokens)), got {max_batch_tokens!r}; or None for "
                                   f"{DEFAULT_BATCH_TOKENS}", param="max_batch_tokens")
    return max_batch_tokens


def plan_batches(lengths: list, max_new_tokens: int, max_context: int, budget: int) -> list:
    """Prompt indices in sub-batches, each holding at most ``budget`` KV tokens when done: rows x
    min(max_context, longest prompt + max_new_tokens). All prompts in their order when they fit
    one batch; else shortest first (least padding). A prompt over the budget alone runs alone.

    Example: ``plan_batches([5, 1, 9], 3, 100, 16)`` is ``[[1, 0], [2]]`` (2 x 8 = 16; 9 + 3 alone).
    """
    if lengths and len(lengths) * min(max_context, max(lengths) + max_new_tokens) <= budget:
        return [list(range(len(lengths)))]
    batches, current = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):  # stable: ties keep their order
        width = min(max_context, lengths[i] + max_new_tokens)  # sorted: the newest row is the longest
        if current and (len(current) + 1) * width > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class BatchDecoder:
    """Lock-step decoding of several prompts; greedy rows equal their one-by-one runs.

    ``engine`` is an :class:`~portable_infer.engine.protocols.Engine`.
    ``guide`` (a :class:`~portable_infer.decode.constraints.Guide`) is needed by rows with a
    constraint; ``vocab_size`` checks logit biases before anything runs.
    """

    def __init__(self, engine, prompts: list, params: list, *, eos_ids=(), max_context: int,
                 pad_id: int = 0, truncate: bool = False, guide=None, vocab_size: int | None = None):
        if len(prompts) != len(params) or not prompts:
            raise InvalidArgumentError("give one SamplingParams per prompt, and at least one prompt")
        self.engine = engine
        self.max_context = max_context
        self.pad_id = pad_id
        self.rows = [Sequence(check_prompt(ids, max_context, truncate), p, eos_ids=eos_ids, vocab_size=vocab_size,
                              guide=guide) for ids, p in zip(prompts, params)]
        self._pending: np.ndarray | None = None
        # where the rows' tokens are picked (batch_pick: the graph's argmax, the device under the
        # grammar masks, or the host), decided once: the rows' parameters do not change
        self._mode = batch_pick.mode(engine, self.rows)
        self._out = None  # the last forward's output, for batch_pick.row_inputs
        self.timings = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0}
        self._prefill()

    # --- state --------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return all(r.finish_reason is not None for r in self.rows)

    def finish(self, row: int, reason: str = "stop") -> None:
        """End a sequence from outside (a stop string matched, a client went away)."""
        if self.rows[row].finish_reason is None:
            self.rows[row].finish_reason = reason
            if self.done:
                self._release()

    def _release(self) -> None:
        """All rows done: drop the KV now, and let the engine give a large cache's memory back."""
        if self.cache is not None:
            held, self.cache = self.cache.nbytes(), None
            self.engine.trim(held)

    # --- steps --------------------------------------------------------------------------------
    def _prefill(self) -> None:
        width = max(len(r.prompt) for r in self.rows)
        ids = np.full((len(self.rows), width), self.pad_id, dtype=np.int64)
        self.mask = np.zeros((len(self.rows), width), dtype=np.int64)
        for i, r in enumerate(self.rows):
            ids[i, width - len(r.prompt):] = r.prompt
            self.mask[i, width - len(r.prompt):] = 1
        longest = width + max(r.params.max_new_tokens for r in self.rows)
        self.cache = self.engine.new_cache(len(self.rows), capacity=min(self.max_context, longest))
        t = time.perf_counter()
        self._forward(ids)
        self.timings["prefill_s"] = time.perf_counter() - t

    def _forward(self, ids: np.ndarray, fill: MaskFill | None = None) -> None:
        self._out = batch_pick.forward(self.engine, self._mode, ids, self.mask, self.cache, fill)

    def _advance(self, fill: MaskFill) -> None:
        t = time.perf_counter()
        self.mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), np.int64)], axis=1)
        self._forward(self._pending[:, None], fill)
        self.timings["decode_s"] += time.perf_counter() - t
        self.timings["decode_steps"] += 1
        self._pending = None

    def _start_masks(self) -> MaskFill:
        """The grammar masks of the running constrained rows, filled while the forward runs."""
        return batch_pick.mask_fill(self.engine, self._mode, [r if r.finish_reason is None else None for r in self.rows])

    def step(self) -> list:
        """Sample one token for every running sequence; returns their :class:`StepToken`."""
        fill = self._start_masks()
        if self._pending is not None and not self.done:
            self._advance(fill)
        masks = fill.result()
        if self.done:
            return []
        nxt = np.full(len(self.rows), self.pad_id, dtype=np.int64)
        events = []
        full = self.cache.length + 1 >= self.max_context  # no room to feed another token
        live = [r if r.finish_reason is None else None for r in self.rows]
        inputs = batch_pick.row_inputs(self._mode, self._out, live, masks)
        self._out = None
        for i, (r, inp) in enumerate(zip(live, inputs)):
            if r is None:
                continue
            pick = inp.step(r, max_context=self.max_context, full=full)
            nxt[i] = pick.token
            events.append(StepToken(i, pick.token, pick.finish_reason, pick.logprob, pick.top_logprobs))
        self._pending = nxt
        if self.done:
            self._release()
        return events

    def run(self) -> list:
        """Decode to the end; the generated ids of every row."""
        while not self.done:
            self.step()
        return [r.output for r in self.rows]

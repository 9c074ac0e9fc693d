"""The decode loop, on token ids: prefill, then one token per step reusing the KV cache.

:class:`BatchDecoder` runs any number of sequences in lock step (left-padded into one batch).
Each :meth:`BatchDecoder.step` samples one token for every running sequence; the forward pass
for those tokens runs lazily at the start of the next step, so a caller that stops a sequence in
between (a stop string, a cancelled stream) never pays for a wasted step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import ContextLengthError, InvalidArgumentError
from .sampling import SamplingParams, apply_penalties, make_sampler, token_logprobs


@dataclass(frozen=True)
class StepToken:
    row: int
    token: int
    finish_reason: str | None  # None while running; "stop" | "length"
    logprob: float | None = None
    top_logprobs: tuple = ()


@dataclass
class _Row:
    prompt: list
    params: SamplingParams
    rng: np.random.Generator
    sampler: object
    stop_ids: frozenset
    output: list = field(default_factory=list)
    finish_reason: str | None = None


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


class BatchDecoder:
    """Lock-step decoding of several prompts; greedy rows equal their one-by-one runs."""

    def __init__(self, engine, prompts: list, params: list, *, eos_ids=(), max_context: int,
                 pad_id: int = 0, truncate: bool = False):
        if len(prompts) != len(params) or not prompts:
            raise InvalidArgumentError("give one SamplingParams per prompt, and at least one prompt")
        self.engine = engine
        self.max_context = max_context
        self.pad_id = pad_id
        self.rows = []
        for ids, p in zip(prompts, params):
            ids = check_prompt(ids, max_context, truncate)
            stop = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else frozenset(eos_ids))
            self.rows.append(_Row(ids, p, np.random.default_rng(p.seed), make_sampler(p), stop))
        self._pending: np.ndarray | None = None
        # All rows plain greedy and the graph has a next_token output (static-KV graphs): the
        # argmax runs on the device and only the ids come back; self.logits stays None.
        self._device_greedy = getattr(engine, "greedy_on_device", False) and all(
            r.params.plain_greedy for r in self.rows)
        self.tokens: np.ndarray | None = None
        self.logits: np.ndarray | None = None
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

    def _forward(self, ids: np.ndarray) -> None:
        if self._device_greedy:
            self.tokens = self.engine.forward(ids, self.mask, self.cache, greedy=True)
        else:
            self.logits = self.engine.forward(ids, self.mask, self.cache)

    def _advance(self) -> None:
        t = time.perf_counter()
        self.mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), np.int64)], axis=1)
        self._forward(self._pending[:, None])
        self.timings["decode_s"] += time.perf_counter() - t
        self.timings["decode_steps"] += 1
        self._pending = None

    def step(self) -> list:
        """Sample one token for every running sequence; returns their :class:`StepToken`."""
        if self._pending is not None and not self.done:
            self._advance()
        if self.done:
            return []
        nxt = np.full(len(self.rows), self.pad_id, dtype=np.int64)
        events = []
        # Plain greedy rows share one vectorized argmax (one call for the batch, not one per row).
        if self._device_greedy:
            argmax = self.tokens
        else:
            argmax = self.logits.argmax(axis=-1) if any(r.params.plain_greedy for r in self.rows) else None
        full = self.cache.length + 1 >= self.max_context  # no room to feed another token
        for i, r in enumerate(self.rows):
            if r.finish_reason is not None:
                continue
            logits = None if self._device_greedy else self.logits[i]
            if r.params.penalized:
                logits = apply_penalties(logits, r.prompt, r.output, r.params)
            tok = int(argmax[i]) if r.params.plain_greedy else int(r.sampler(logits, r.rng))
            lp, top = (None, ())
            if r.params.logprobs is not None:
                lp, top = token_logprobs(logits, tok, r.params.logprobs)
                top = tuple(top)
            r.output.append(tok)
            if tok in r.stop_ids:
                r.finish_reason = "stop"
            elif len(r.output) >= r.params.max_new_tokens or full:
                r.finish_reason = "length"
            nxt[i] = tok
            events.append(StepToken(i, tok, r.finish_reason, lp, top))
        self._pending = nxt
        return events

    def run(self) -> list:
        """Decode to the end; the generated ids of every row."""
        while not self.done:
            self.step()
        return [r.output for r in self.rows]

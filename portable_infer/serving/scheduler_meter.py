"""The scheduler's counters, token rate, recent request timings and observers.

Not thread-safe on its own: the scheduler changes the counters under its lock, in the same
critical section as the state they count (so a stats snapshot is consistent). Observers are
called outside that lock and may never stop the engine (their errors are logged).

:class:`StepClock` is where the step loop's time goes (loop thread only; snapshots are copies).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from collections import deque

from portable_infer.serving.handle import RequestStats

logger = logging.getLogger("portable_infer.serving.scheduler")

RATE_WINDOW_S = 10.0  # tokens_per_s is measured over this window
RECENT = 256  # finished requests kept for stats()
# The step loop's seconds since start, by where they went: the prefill and decode parts of each
# step, split into the time the loop waited on the engine's forwards ("forward": compute on the
# CPU, the device's time not hidden on a GPU) and the rest ("host": row rules, picks, copies,
# hand-over); "plan" (planning, leaves) and "idle" (nothing to do). Steps and decoded rows counted.
STEP_SECONDS = ("prefill_forward", "prefill_host", "decode_forward", "decode_host", "plan", "idle")
STEP_COUNTS = ("prefill_steps", "decode_steps", "decode_rows", "mixed_steps")  # mixed: a prefill in a decode step
COUNTERS = ("prompt_tokens", "generation_tokens", "requests_finished", "requests_cancelled",
            "requests_rejected", "requests_failed", "requests_preempted")


class Meter:
    """Counters since start, generated tokens over the last RATE_WINDOW_S, the last RECENT
    requests' timings, and the observer hooks (first_token, inter_token, finished)."""

    def __init__(self, observer=None):
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.observers = [observer] if observer is not None else []
        self.recent: deque = deque(maxlen=RECENT)
        self._rate: deque = deque()  # (time, tokens) per step

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def step(self, tokens: int) -> None:
        """A step generated ``tokens`` tokens."""
        now = time.perf_counter()
        self.counters["generation_tokens"] += tokens
        self._rate.append((now, tokens))
        self._prune(now)

    def tokens_per_s(self) -> float:
        now = time.perf_counter()
        self._prune(now)
        span = now - self._rate[0][0] if self._rate else 0.0
        return sum(n for _, n in self._rate) / max(span, 1.0)

    def _prune(self, now: float) -> None:
        while self._rate and self._rate[0][0] < now - RATE_WINDOW_S:
            self._rate.popleft()

    def retry_after(self, waiting: int, max_batch: int) -> float:
        """Seconds until a slot is likely free: recent request durations x the queue ahead."""
        durations = [s.total_s for s in list(self.recent)[-32:]]
        per = sum(durations) / len(durations) if durations else 1.0
        return max(1.0, per * (waiting + 1) / max_batch)

    def observe(self, hook: str, value) -> None:
        for observer in self.observers:
            try:
                getattr(observer, hook)(value)
            except Exception:  # metrics must never stop the engine
                logger.exception("scheduler observer %s failed", hook)

    def finished(self, stats: RequestStats) -> None:
        self.observe("finished", stats)


class StepClock:
    """Cumulative seconds by :data:`STEP_SECONDS` and counts by :data:`STEP_COUNTS` (loop thread
    writes, :meth:`snapshot` copies): what bounds the tokens/s, the device or the host."""

    def __init__(self):
        self.totals = dict.fromkeys(STEP_SECONDS + STEP_COUNTS, 0)

    def add(self, **amounts) -> None:
        for name, value in amounts.items():
            self.totals[name] += value

    def snapshot(self) -> dict:
        return dict(self.totals)

    @contextmanager
    def timed(self, name: str):
        """The block's seconds added to ``name`` (plan, idle)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - t

    @contextmanager
    def phase(self, name: str, batch, **counts):
        """A step's ``name`` phase (prefill, decode) in the block: its seconds split into the
        forwards' (``batch.forward_s`` grew by them) and the host's, one step, and ``counts``."""
        t, waited = time.perf_counter(), batch.forward_s
        try:
            yield
        finally:
            forward = batch.forward_s - waited
            self.add(**{f"{name}_forward": forward, f"{name}_host": time.perf_counter() - t - forward,
                        f"{name}_steps": 1}, **counts)

"""The scheduler's prefill half: waiting prompts become rows of the running batch.

A mixin of :class:`~portable_infer.scheduler.Scheduler` (its loop thread calls these; they use
its engine, lock, queues and counters). Per loop step::

    fresh requests ─ prefix cache lookup ─┬─ several short prompts: one left-padded forward
                                          │    (a group; if it fails, each is retried alone)
                                          └─ the head alone, at most prefill_chunk tokens
                 ─> first token sampled ─> joined to the batch (Scheduler._join)

A row whose first token fails (NaN logits...) ends alone; the rest of its group joins the batch.
"""

from __future__ import annotations

import logging

import numpy as np

from . import kvblocks
from .request import Request

logger = logging.getLogger("portable_infer.scheduler")


class PrefillSteps:
    """Prefill verbs of the scheduler (mixed into it; not used on its own)."""

    def _pop_prefilling(self, r: Request, anywhere: bool = False) -> None:
        with self._lock:
            if self._prefilling and self._prefilling[0] is r:
                self._prefilling.popleft()
            elif anywhere and r in self._prefilling:
                self._prefilling.remove(r)
        if r.state == "done":
            r.cache = None

    def _reuse_prefixes(self, fresh: list) -> None:
        """Start requests whose prompt begins with a cached prefix of at least ``prefix_min_tokens``
        from that prefix's KV; note shorter hits, used if the request is prefilled alone."""
        for r in fresh:
            r.prefix_checked = True
            if r.prefilled or not self.prefixes.enabled:
                continue
            n = self.prefixes.match(r.prompt)
            if n and n >= self._prefix_min:
                self._start_from_prefix(r)
            else:
                r.short_prefix = n

    def _start_from_prefix(self, r: Request) -> None:
        r.short_prefix = 0
        n, arrays = self.prefixes.lookup(r.prompt)
        if n:
            r.cache, r.prefilled = kvblocks.from_prefix(self.engine, arrays, n, self._capacity([r])), n

    def _remember(self, prompts: list, cache) -> None:
        """Offer prefilled prompts' KV (row i of ``cache`` holds ``prompts[i]`` right-aligned) to
        the prefix cache."""
        new = [i for i, p in enumerate(prompts) if self.prefixes.wants(p)]
        if not new:  # nothing to keep: spare the KV's copy to the host (a device round trip on GPUs)
            return
        try:
            for i, arrays in zip(new, kvblocks.prompt_kv(cache, prompts, new, self.engine)):
                self.prefixes.store(prompts[i], arrays)
        except Exception:  # noqa: BLE001 - a cache that could not keep a prefix fails no request
            logger.warning("prompt prefixes not cached", exc_info=True)

    def _capacity(self, rows: list) -> int:
        """KV tokens the rows may need (fixed-size caches are allocated for it)."""
        return min(self.max_context, max(len(r.prompt) + r.params.max_new_tokens for r in rows))

    def _prefill_group_candidates(self) -> list:
        """Waiting prompts that each fit one chunk and together at most four chunks, from the
        head of the queue on (called under the lock): one left-padded forward prefills them all."""
        group, tokens = [], 0
        for r in self._prefilling:
            n = len(r.prompt)
            if r.prefilled or r.state == "done" or r.alone or n > self.config.prefill_chunk:
                break
            if tokens + n > 4 * self.config.prefill_chunk:
                break
            group.append(r)
            tokens += n
        return group

    def _prefill_group(self, group: list) -> None:
        """Prefill several prompts in one forward (left-padded), then join them to the batch."""
        width = max(len(r.prompt) for r in group)
        ids = np.zeros((len(group), width), np.int64)
        mask = np.zeros((len(group), width), np.int64)
        for i, r in enumerate(group):
            ids[i, width - len(r.prompt):] = r.prompt
            mask[i, width - len(r.prompt):] = 1
        cache = self.engine.new_cache(len(group), capacity=self._capacity(group))
        try:
            logits = self.engine.forward(ids, mask, cache)
        except Exception:  # noqa: BLE001 - maybe one request's doing: each is prefilled alone next
            logger.warning("prefill of %d requests together failed; prefilling them one at a time", len(group),
                           exc_info=True)
            for r in group:
                r.alone = True
            return
        self._remember([r.prompt for r in group], cache)
        with self._lock:
            for r in group:
                self._prefilling.remove(r)
                r.prefilled = len(r.prompt)
            self.meter.count("prompt_tokens", int(mask.sum()))
        first = np.zeros(len(group), np.int64)
        n = 0
        for i, r in enumerate(group):
            if r.state == "done":  # cancelled while prefilling: dropped at the next decode step
                continue
            try:
                first[i] = self._sample(r, logits[i])
            except Exception as exc:  # noqa: BLE001 - this row's failure; it is dropped like a cancelled one
                self._fail_row(r, exc)
                continue
            n += 1
            with self._lock:
                if r.state != "done":
                    r.state = "running"
        self._count_step(n)
        self._join(group, cache, mask, first)

    def _prefill_chunk(self, r: Request) -> None:
        if r.state == "done":  # cancelled while it waited for its turn
            self._pop_prefilling(r)
            return
        if r.cache is None:
            r.cache = self.engine.new_cache(1, capacity=self._capacity([r]))
        end = min(r.prefilled + self.config.prefill_chunk, len(r.prompt))
        ids = np.asarray([r.prompt[r.prefilled:end]], np.int64)
        logits = self.engine.forward(ids, np.ones((1, end), np.int64), r.cache)
        with self._lock:
            self.meter.count("prompt_tokens", end - r.prefilled)
        r.prefilled = end
        if end < len(r.prompt):
            return
        self._remember([r.prompt], r.cache)
        self._pop_prefilling(r)
        if r.state == "done":
            return
        tok = self._sample(r, logits[0])
        self._count_step(1)
        if r.state == "done":  # finished on its first token
            r.cache = None
            return
        with self._lock:
            if r.state == "done":
                r.cache = None
                return
            r.state = "running"
        self._join([r], r.cache, np.ones((1, r.cache.length), np.int64), np.asarray([tok], np.int64))
        r.cache = None

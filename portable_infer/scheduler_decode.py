"""The scheduler's decode half: one forward for the running batch, one token per row.

A mixin of :class:`~portable_infer.scheduler.Scheduler` (its loop thread calls these; they use
its engine, lock and meter). The batch is left-padded: rows join under it (``_join``, KV merged
by :mod:`portable_infer.kvblocks`) and finished rows are sliced out (``_drop_done_rows``). Each
row's token goes through :meth:`Request.take_token`; what fails there ends that request only.
"""

from __future__ import annotations

import numpy as np

from . import kvblocks
from .constraints import MaskFill
from .request import Request


class DecodeSteps:
    """Decode verbs of the scheduler (mixed into it; not used on its own)."""

    def _join(self, rows: list, cache, mask: np.ndarray, first: np.ndarray) -> None:
        """Stack prefilled rows (their KV, mask and first tokens) under the running batch."""
        self._drop_done_rows(compact=True)
        if self._rows:
            self._cache, self._mask = kvblocks.merge(self._cache, self._mask, cache, mask, self.engine)
            self._pending = np.concatenate([self._pending, first])
        else:
            self._cache, self._mask, self._pending = cache, mask, first
        self._rows.extend(rows)

    def _drop_done_rows(self, compact: bool = False) -> None:
        """Slice finished rows out of the batch (``compact``: even where they may stay, see
        ``_defer_leave``)."""
        keep = [i for i, r in enumerate(self._rows) if r.state != "done"]
        if len(keep) == len(self._rows):
            return
        if not keep:
            held = self._cache.nbytes()
            self._rows, self._cache, self._mask, self._pending = [], None, None, None
            self.engine.trim(held)  # the batch is gone: a large one's memory goes back to the OS
            return
        if self._defer_leave and not compact and 2 * len(keep) > len(self._rows):
            return
        self._cache, self._mask = kvblocks.take(self._cache, self._mask, keep, self.engine)
        self._rows = [self._rows[i] for i in keep]
        self._pending = self._pending[keep]

    def _decode(self) -> None:
        self._drop_done_rows()
        if not self._rows:
            return
        # a finished row still in the batch (see _defer_leave) gets a padding column: it holds still
        live = np.array([[r.state != "done"] for r in self._rows], np.int64)
        self._mask = np.concatenate([self._mask, live], axis=1)
        # every row plain greedy on a graph with next_token: the argmax runs on the device and
        # only the ids come back (the logits stay there)
        greedy = getattr(self.engine, "greedy_on_device", False) and all(
            r.params.plain_greedy for r in self._rows if r.state != "done")
        extra = {"greedy": True} if greedy else {}
        # the grammar masks of the constrained rows: one batched fill, while the forward runs
        matchers = {i: r.seq.matcher for i, r in enumerate(self._rows)
                    if r.seq.matcher is not None and r.state != "done"}
        fill = MaskFill(matchers, len(self._rows), max(r.seq.mask_vocab for r in self._rows))
        out = self.engine.forward(self._pending[:, None], self._mask, self._cache, **extra)
        masks = fill.result()
        nxt = np.array(self._pending)
        n = 0
        for i, r in enumerate(self._rows):
            if r.state == "done":  # cancelled during the forward
                continue
            try:
                mask = masks[i] if i in matchers else None
                nxt[i] = self._sample(r, None, int(out[i])) if greedy else self._sample(r, out[i], mask=mask)
            except Exception as exc:  # noqa: BLE001 - one row's failure ends that request only
                self._fail_row(r, exc)
                continue
            n += 1
        self._pending = nxt
        self._count_step(n)

    def _count_step(self, tokens: int) -> None:
        with self._lock:
            self.meter.step(tokens)

    def _sample(self, r: Request, logits: np.ndarray | None, tok: int | None = None,
                mask: np.ndarray | None = None) -> int:
        """Take ``r``'s next token (``tok``: already picked on the device, plain greedy rows;
        ``mask``: its grammar bitmask), stream it, and end ``r`` when a stop rule says so."""
        first = r.first_token is None
        resp = r.take_token(logits, tok, self.max_context, mask)
        if first:
            self.meter.observe("first_token", r.first_token - r.submitted)
        else:
            self.meter.observe("inter_token", r.gaps[-1])
        if resp.finish_reason is None:
            r.handle._put(resp)
            return resp.token
        with self._lock:
            released = self._release(r)
            if released:
                self.meter.count("requests_finished")
        if released:  # else it was cancelled meanwhile, and its handle already ended
            self._record(r, resp.finish_reason)
            r.handle._put(resp)
        return resp.token

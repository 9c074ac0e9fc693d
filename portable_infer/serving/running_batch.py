"""The running batch: the rows being decoded, their KV cache and mask, and every forward.

It does what the planner (:mod:`portable_infer.serving.scheduler_plan`) decided, one verb per part of
a :class:`~portable_infer.serving.scheduler_plan.StepPlan`, and the loop (:mod:`portable_infer.serving.scheduler`)
calls those verbs::

    start_from_prefix   a request's batch-1 cache from a copy of a cached prompt prefix
    prefill             one forward: whole prompts left-padded together, or one prompt's next
                        chunk on its own batch-1 cache; a prompt that ends here is offered to
                        the prefix cache and its first token is picked
    join                those rows stacked under the batch (the cache's merge)
    leave               finished rows sliced out (the cache's take: columns of padding in every
                        row cut off)
    decode              one forward for the batch, one token per live row

Each row's token goes through :meth:`Sequence.step <portable_infer.decode.sequence.Sequence.step>`
(penalties, grammar mask, sampler, stop/length rules), as everywhere; what it returns per row is
a :class:`RowResult` (the pick, or that row's own error), which the loop turns into text and
handle pieces. Padding is exact: positions are ``cumsum(mask) - 1``. Loop thread only.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from portable_infer.decode import batch_pick
from portable_infer.decode.batch_pick import RowInput
from portable_infer.decode.sequence import Pick

logger = logging.getLogger("portable_infer.serving.scheduler")


@dataclass(frozen=True)
class RowResult:
    """What one row produced in a forward: its ``pick``, or the ``error`` that ends it alone
    (NaN logits, a grammar that refuses every token)."""

    request: object  # the scheduler's Request
    pick: Pick | None
    error: BaseException | None = None


@dataclass
class Prefilled:
    """Rows whose prompts ended in one prefill forward: their cache and mask (to join the batch)
    and their first tokens' results (rows that ended meanwhile have none)."""

    rows: list
    cache: object
    mask: np.ndarray
    results: list  # [RowResult]


def pick_row(r, inp: RowInput, *, max_context: int) -> RowResult:
    """``r``'s next token through its :class:`~portable_infer.decode.sequence.Sequence`, from
    ``inp`` (what :mod:`~portable_infer.decode.batch_pick` gave the row); a failure is this row's
    (its result carries the error)."""
    try:
        return RowResult(r, inp.step(r.seq, max_context=max_context))
    except Exception as exc:  # noqa: BLE001 - one row's failure ends that request only
        return RowResult(r, None, exc)


class RunningBatch:
    """The decode batch (rows left-padded into one cache and mask, each with its next token
    pending) and the batch-1 caches of prompts part-way through a chunked prefill.

    Args:
        engine: the model's :class:`~portable_infer.engine.protocols.Engine`; its caches
            (:class:`~portable_infer.engine.protocols.KVCache`) do the row operations.
        prefixes: the :class:`~portable_infer.serving.prefix_cache.PrefixCache` prompts are offered to.
        max_context: the model's context (a row ends when it is full).
    """

    mixes_prefill = False  # a step's prefill runs in a forward of its own (PagedBatch: inside the decode's)
    blocks_on_demand = False  # rows reserve their whole KV at admission (PagedBatch: as they grow; kv_demand.py)

    def __init__(self, engine, prefixes, max_context: int):
        self.engine = engine
        self.prefixes = prefixes
        self.max_context = max_context
        self.rows: list = []  # requests, in row order
        self.cache = None
        self.mask = None  # [rows, width] int64, left padding 0
        self.pending = None  # [rows] int64: each row's last token, fed by the next decode
        self._partial: dict = {}  # request id -> its batch-1 cache while its prompt is chunked in
        self.forward_s = 0.0  # seconds the loop waited on forwards (the scheduler's StepClock reads it)
        self._unpicked: list = []  # the last overlapped forward's tokens, not through their rows' rules yet
        self._worker = None  # the thread that picks them while the next forward runs (_overlap)

    def _wait(self, forward, *args):
        """``forward(*args)``, its wall time counted in :attr:`forward_s`."""
        t = time.perf_counter()
        try:
            return forward(*args)
        finally:
            self.forward_s += time.perf_counter() - t

    def _overlap(self, forward, early) -> tuple:
        """``(forward(), results)``: the forward on this thread (ONNX Runtime releases the GIL
        while the device works) while a worker thread takes the last overlapped forward's tokens
        through their rows' rules (:meth:`_pick_unpicked`) and hands them to ``early`` (then
        ``results`` is empty). The batches that overlap (plain greedy steps, as vLLM's async
        scheduling) keep what the forward returns as the next ``_unpicked``."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="portable-infer-picks")
        picks = self._worker.submit(self._picks_handed_over, early)
        try:
            out = self._wait(forward)
        except BaseException:
            futures.wait([picks])  # the picks touch the rows: they end before the failure goes up
            raise
        return out, picks.result()

    def _picks_handed_over(self, early) -> list:
        """:meth:`_pick_unpicked`, its results given to ``early`` where there is one (then none returned)."""
        results = self._pick_unpicked()
        if early is None:
            return results
        early(results)
        return []

    def _pick_unpicked(self) -> list:
        """The last overlapped forward's tokens through their rows' rules (none here: this batch
        does not overlap)."""
        return []

    def flush(self) -> list:
        """The results of tokens still in flight (an overlapped forward's), picked now."""
        return self._pick_unpicked()

    def nbytes(self) -> int:
        """KV bytes the decode batch holds now."""
        cache = self.cache
        return cache.nbytes() if cache is not None else 0

    # --- prefill ---------------------------------------------------------------------------------
    def start_from_prefix(self, r, tokens: int, capacity: int) -> None:
        """``r`` continues from a copy of the cached KV of its first ``tokens`` prompt tokens."""
        n, arrays = self.prefixes.lookup(r.ids)
        if n != tokens:  # the plan read the same cache moments ago: a bug, not the request's doing
            raise RuntimeError(f"the prefix cache holds {n} tokens of request {r.id}'s prompt, the plan said {tokens}")
        cache = self.engine.new_cache(1, capacity=capacity)
        cache.fill_prefix(arrays, n)
        self._partial[r.id] = cache

    def forget(self, ids) -> None:
        """Drop the partial prefill KV of requests that ended."""
        for i in ids:
            self._partial.pop(i, None)

    def prefill(self, rows: list, step) -> Prefilled | None:
        """Run ``step`` (a :class:`~portable_infer.serving.scheduler_plan.Prefill`; ``rows`` its requests
        in slice order). Returns the rows whose prompts ended, with first tokens picked for those
        not ended meanwhile; None while a chunked prompt has more to go."""
        if step.grouped:
            cache, mask, inputs = self._group_forward(rows, step)
        else:
            (r,), (s,) = rows, step.slices
            cache = self._partial.pop(r.id, None)
            if cache is None:
                cache = self._prefill_cache(1, step.capacity, s.last)
            if cache.length != s.start:
                raise RuntimeError(f"request {r.id} holds {cache.length} tokens of KV; "
                                   f"the plan prefills from {s.start}")
            mask = np.ones((1, s.end), np.int64)
            ids = np.asarray([r.ids[s.start:s.end]], np.int64)
            if not s.last:
                self._wait(self.engine.forward, ids, mask, cache)
                self._partial[r.id] = cache
                return None
            inputs = self._first_forward(rows, ids, mask, cache)
        self._remember([r.ids for r in rows], cache)
        results = [pick_row(r, inputs[i], max_context=self.max_context)
                   for i, r in enumerate(rows) if r.state != "done" and inputs[i] is not None]  # else: cancelled
        return Prefilled(rows, cache, mask, results)

    def _first_forward(self, rows: list, ids: np.ndarray, mask: np.ndarray, cache) -> list:
        """The forward that ends ``rows``' prompts, and each row's :class:`RowInput` for its first
        token (None: cancelled): rows that sample drawn on the device where the engine draws
        there (``batch_pick``'s sample mode: the same path as their later tokens), the others
        from their logits here."""
        seqs = [r.seq if r.state != "done" else None for r in rows]
        if batch_pick.mode(self.engine, seqs) == batch_pick.SAMPLE:
            out = self._wait(self.engine.forward_on_device, ids, mask, cache)
            return batch_pick.row_inputs(batch_pick.SAMPLE, out, seqs, None)
        logits = self._wait(self.engine.forward, ids, mask, cache)
        return [None if s is None else RowInput(logits[i]) for i, s in enumerate(seqs)]

    def _group_forward(self, rows: list, step) -> tuple:
        width = max(r.prompt_len for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, (r, s) in enumerate(zip(rows, step.slices)):
            n = r.prompt_len
            if (s.start, s.end) != (0, n):
                raise RuntimeError(f"a grouped prefill takes whole prompts; request {r.id} got [{s.start}, {s.end})")
            ids[i, width - n:] = r.ids
            mask[i, width - n:] = 1
        cache = self._prefill_cache(len(rows), step.capacity, True)
        return cache, mask, self._first_forward(rows, ids, mask, cache)

    def _prefill_cache(self, rows: int, capacity: int, joins: bool):
        """The cache a prefill of ``rows`` prompts writes (``joins``: they all end in this forward)."""
        return self.engine.new_cache(rows, capacity=capacity)

    def _remember(self, prompts: list, cache) -> None:
        """Offer prefilled prompts' KV (row i of ``cache`` holds ``prompts[i]``) to the prefix cache."""
        new = [i for i, p in enumerate(prompts) if self.prefixes.wants(p)]
        if not new:  # nothing to keep: spare the KV's copy to the host (a device round trip on GPUs)
            return
        try:
            for i, arrays in zip(new, cache.prompt_kv(prompts, new)):
                self.prefixes.store(prompts[i], arrays)
        except Exception:  # noqa: BLE001 - a cache that could not keep a prefix fails no request
            logger.warning("prompt prefixes not cached", exc_info=True)

    # --- the batch -------------------------------------------------------------------------------
    def join(self, done: Prefilled) -> None:
        """Stack the rows of ``done`` that are still live under the batch, each with its first
        token pending (a row that ended on its first token never joins)."""
        first = {id(res.request): res.pick.token for res in done.results if res.pick is not None}
        keep = [i for i, r in enumerate(done.rows) if r.state != "done" and id(r) in first]
        if not keep:
            return
        cache, mask = done.cache, done.mask
        if len(keep) < len(done.rows):
            cache, mask = cache.take(mask, keep)
        rows = [done.rows[i] for i in keep]
        tokens = np.array([first[id(r)] for r in rows], np.int64)
        if self.rows:
            self.cache, self.mask = self.cache.merge(self.mask, cache, mask)
            self.pending = np.concatenate([self.pending, tokens])
        else:
            self.cache, self.mask, self.pending = cache, mask, tokens
        self.rows = self.rows + rows  # a new list: stats() reads the old one from other threads

    def leave(self, ids) -> None:
        """Slice the rows of requests ``ids`` out of the batch."""
        gone = set(ids)
        keep = [i for i, r in enumerate(self.rows) if r.id not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            held = self.nbytes()
            self.reset()
            self.engine.trim(held)  # the batch is gone: a large one's memory goes back to the OS
            return
        self.cache, self.mask = self.cache.take(self.mask, keep)
        self.rows = [self.rows[i] for i in keep]
        self.pending = self.pending[keep]

    def _advance_mask(self) -> np.ndarray:
        """The next decode forward's mask column (a row that finished but is still in the batch,
        a deferred leave, gets padding: it holds still), appended; returns it [rows, 1]."""
        live = np.array([[r.state != "done"] for r in self.rows], np.int64)
        self.mask = np.concatenate([self.mask, live], axis=1)
        return live

    def reset(self) -> None:
        """Forget the batch (its forward failed, or every row left)."""
        self.rows, self.cache, self.mask, self.pending = [], None, None, None

    def decode(self, early=None) -> list:
        """One forward for every row and one token per live row; returns their :class:`RowResult`
        (``early``: a batch that has results before its forward ends, the slot batch's
        overlapped steps, hands them to ``early(results)`` then and returns the rest)."""
        rows = self.rows
        if not any(r.state != "done" for r in rows):
            return []  # they ended during this step; they leave at the next one
        self._advance_mask()
        # where the tokens are picked: the graph's argmax, the device under grammar masks, or the host
        seqs = [r.seq if r.state != "done" else None for r in rows]
        how = batch_pick.mode(self.engine, seqs)
        return self._picks(how, rows, seqs,
                           lambda fill: batch_pick.forward(self.engine, how, self.pending[:, None], self.mask, self.cache,
                                                           fill))

    def _picks(self, how: str, rows: list, seqs: list, forward) -> list:
        """``forward()`` (picking mode ``how``) while the grammar masks of the constrained rows
        fill (one batched fill), then one token per live row: ``seqs[i]`` None is a row that picks
        nothing (free, or ended before the step), and a row cancelled during the forward gets
        none. Each pick is its row's next pending token."""
        fill = batch_pick.mask_fill(self.engine, how, seqs)
        out = self._wait(forward, fill)
        inputs = batch_pick.row_inputs(how, out, seqs, fill.result())
        results = []
        for i, r in enumerate(rows):
            if seqs[i] is None or r.state == "done" or inputs[i] is None:
                continue
            res = pick_row(r, inputs[i], max_context=self.max_context)
            if res.pick is not None:
                self.pending[i] = res.pick.token
            results.append(res)
        return results

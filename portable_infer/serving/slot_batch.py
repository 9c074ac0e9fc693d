"""The running batch as fixed slots of one KV buffer: rows join and leave without moving the others.

:class:`~portable_infer.serving.running_batch.RunningBatch` stacks the rows of a decode batch
into new buffers of the new batch size at every join and leave (the caches' ``merge`` and
``take``). On a GPU that copies the whole batch's KV each time and every batch size captures a
CUDA graph of its own. Here, as vLLM's persistent batch does, the batch is ``max_batch`` slots,
rows of one buffer (:meth:`StaticEngine.buffer <portable_infer.engine.static.StaticEngine.buffer>`)::

    slot    0    1    2    3    4    5    6    7
    row     a    b    .    c    d    .    .    .      a decode step runs slots [0, 6): bucket(5) = 6
                 ^ leaves: its slot is free (no copy)   (one view and one CUDA graph per bucket)
    prefill of 2 whole prompts -> written straight into free slots 5, 6 (a view of those rows)

- A prefill whose prompts all end in its forward writes into a run of free slots (a view,
  :meth:`StaticEngine.view <portable_infer.engine.static.StaticEngine.view>`): joining copies
  nothing. Other prompts (chunked, from a cached prefix, or no free run) are prefilled in caches
  of their own and their rows copied into free slots when they end.
- A row that leaves frees its slot; nothing moves. Free slots decode as rows of one token that
  never advance (their output is not read), so a free slot needs no masking in the graph.
- A decode step runs the slots up to the highest one in use, rounded up to a bucket
  (:data:`~portable_infer.engine.cuda_graphs.BUCKETS`): a few batch sizes, each with its own view and CUDA graph, captured once.
  When the rows in use fit a bucket half the size, they move down to the lowest slots, all in
  one copy per buffer (kv_static.move_rows), so that the steps get smaller.
- The buffer holds ``max_batch`` rows of the largest capacity asked for so far; a request that
  needs more moves every row into a larger buffer once. The KV budget bounds it: a row holds at
  most the budget over ``max_batch`` (``row_limit``; the scheduler refuses longer requests).
- Plain greedy batches overlap the host with the device (vLLM's async scheduling): each forward
  starts on the previous one's argmax ids, and the host runs the previous tokens through their
  rows' rules while it runs (:meth:`SlotBatch._overlapped`). A row those tokens end decodes one
  more token, which is dropped.

Same verbs and results as the running batch, so the scheduler's loop is the same (loop thread only).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from portable_infer.decode import batch_pick
from portable_infer.engine.cuda_graphs import bucket
from portable_infer.engine.kv_static import copy_rows, move_rows
from portable_infer.serving.running_batch import RunningBatch, pick_row
from portable_infer.serving.scheduler_plan import kv_need

logger = logging.getLogger(__name__)


class SlotBatch(RunningBatch):
    """The running batch on ``max_batch`` slots of one static-KV buffer (engines with ``view``).

    Args:
        engine: a :class:`~portable_infer.engine.static.StaticEngine`.
        prefixes, max_context: as for :class:`RunningBatch`.
        max_batch: the slots (the scheduler's ``max_batch``).
    """

    def __init__(self, engine, prefixes, max_context: int, max_batch: int, row_limit: int | None = None):
        super().__init__(engine, prefixes, max_context)
        self.max_batch = max_batch
        self.row_limit = row_limit  # tokens a row may hold: the buffer is never longer (the KV budget's share)
        self.slots: list = [None] * max_batch  # the request in each slot (None: free)
        self.lengths = np.ones(max_batch, np.int64)  # KV tokens per slot (a free slot: 1)
        self.pending = np.zeros(max_batch, np.int64)  # each slot's next input token
        self._views: dict = {}  # decode batch size -> its view of the buffer
        self.overlap = True  # plain greedy steps start before the host picks the last one's tokens

    # --- the buffer and its slots ------------------------------------------------------------------
    def _buffer(self, capacity: int):
        """The buffer, with room for ``capacity`` tokens per row (made, or moved to a larger one)."""
        old = self.cache
        if old is not None and old.capacity >= capacity:
            return old
        new = self.engine.buffer(self.max_batch, capacity, most=self.row_limit)
        if old is not None:
            top = self._top()
            if top:  # every row in use moves once, into the larger rows
                copy_rows(self.engine.view(new, 0, top), [(old, np.arange(top))])
        new.rows = self.lengths  # the buffer's rows are the slots' lengths (one array)
        self.cache, self._views = new, {}
        return new

    def warm_up(self, prefill: int = 0) -> list:
        """Every decode bucket's view (and CUDA graph) made before the first request, as vLLM
        captures its batch sizes at startup: the buffer at the row limit (the KV budget's share,
        so no later request grows it and drops the views), then one step of free slots per bucket
        up to ``max_batch``; then a grouped prefill of about ``prefill`` prompt tokens into free
        slots, thrown away, so that the device's memory pool has grown to the largest prefill
        before requests wait on it (vLLM's profile run). Returns the sizes run (none without a
        row limit: the buffer would be ``max_context`` long)."""
        if self.row_limit is None or self.cache is not None:
            return []
        t = time.perf_counter()
        self._buffer(self.row_limit)
        sizes = sorted({bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)})
        for size in sizes:  # free slots decode one token that never advance
            self._forward(batch_pick.GREEDY, self._view(size), np.zeros((size, 1), np.int64))
        width = min(prefill, self.row_limit - 1)
        if width >= 1:
            rows = min(-(-prefill // width), self.max_batch)
            cache = self._prefill_cache(rows, self.row_limit, True)  # slots [0, rows): all are free
            self.engine.forward(np.full((rows, width), 3, np.int64), np.ones((rows, width), np.int64), cache)
            for i in range(rows):  # they stay free (the view's rows are theirs)
                self._free(i)
        logger.info("decode batch sizes %s and a prefill of %d tokens made ready in %.1f s", sizes,
                    rows * width if width >= 1 else 0, time.perf_counter() - t)
        return sizes

    def _view(self, size: int):
        """The decode view of slots ``[0, size)`` (one per bucket, made once per buffer)."""
        view = self._views.get(size)
        if view is None:
            view = self._views[size] = self.engine.view(self.cache, 0, size, decode=True)
        return view

    def _top(self) -> int:
        """One past the highest slot in use (0: none)."""
        used = [i for i, r in enumerate(self.slots) if r is not None]
        return used[-1] + 1 if used else 0

    def _free_run(self, count: int) -> int | None:
        """The first slot of the lowest run of ``count`` free slots, or None."""
        run = 0
        for i, r in enumerate(self.slots):
            run = run + 1 if r is None else 0
            if run == count:
                return i - count + 1
        return None

    def _prefill_cache(self, rows: int, capacity: int, joins: bool):
        """Prompts that all end in this forward write into a run of free slots; others get a cache of their own."""
        if joins:
            buffer = self._buffer(capacity)
            start = self._free_run(rows)
            if start is not None:
                return self.engine.view(buffer, start, rows)
        return self.engine.new_cache(rows, capacity=capacity)

    def _place(self, slot: int, request, length: int, token: int) -> None:
        self.slots[slot] = request
        self.lengths[slot] = length
        self.pending[slot] = token

    def _free(self, slot: int) -> None:
        self._place(slot, None, 1, 0)

    def _publish(self) -> None:
        self.rows = [r for r in self.slots if r is not None]  # a new list: stats() reads it from other threads

    # --- the verbs ---------------------------------------------------------------------------------
    def join(self, done) -> None:
        """The rows of ``done`` still live take their slots, each with its first token pending."""
        first = {id(res.request): res.pick.token for res in done.results if res.pick is not None}
        live = [i for i, r in enumerate(done.rows) if r.state != "done" and id(r) in first]
        cache = done.cache
        if getattr(cache, "owner", None) is self.cache and self.cache is not None:  # prefilled in place
            for i, r in enumerate(done.rows):
                if i in live:
                    self._place(cache.start + i, r, int(cache.rows[i]), first[id(r)])
                else:
                    self._free(cache.start + i)
        elif live:  # every live row into a free slot, in one move (room for what the requests need,
            # which may be less than their cache's rounded rows)
            buffer = self._buffer(min(cache.capacity, kv_need([done.rows[i] for i in live], self.max_context)))
            free = [i for i, r in enumerate(self.slots) if r is None][:len(live)]
            if len(free) < len(live):  # the scheduler admits at most max_batch requests
                raise RuntimeError(f"no free slot for requests {', '.join(done.rows[i].id for i in live[len(free):])}")
            move_rows(buffer, cache, live, free)
            for i, slot in zip(live, free):
                self._place(slot, done.rows[i], int(cache.rows[i]), first[id(done.rows[i])])
        self._publish()

    def leave(self, ids) -> None:
        """The slots of requests ``ids`` are free; when the rows left fit a bucket half the size
        of the one they decode in, the highest move down."""
        gone = set(ids)
        for i, r in enumerate(self.slots):
            if r is not None and r.id in gone:
                self._free(i)
        self._publish()
        top, count = self._top(), len(self.rows)
        if count and 2 * bucket(count, self.max_batch) <= bucket(top, self.max_batch):
            self._compact(count)

    def _compact(self, count: int) -> None:
        """The ``count`` rows in use move down to slots ``[0, count)`` in order: from the first one
        out of place on, every row in one move (one copy per buffer, not one per row)."""
        used = [i for i, r in enumerate(self.slots) if r is not None]
        first = next((k for k, i in enumerate(used) if i != k), count)
        moved = {i: k for k, i in enumerate(used) if k >= first}
        move_rows(self.cache, self.cache, list(moved), list(moved.values()))
        state = {i: (self.slots[i], int(self.lengths[i]), int(self.pending[i])) for i in moved}
        for i in moved:
            self._free(i)
        for i, k in moved.items():
            self._place(k, *state[i])
        self._unpicked = [(moved.get(i, i), r, inp) for i, r, inp in self._unpicked]  # their rows moved
        self._publish()

    def reset(self) -> None:
        """Every slot free, the overlapped forward's tokens dropped (the buffer and its views stay;
        prompts part-way through a chunked prefill go on, as in RunningBatch)."""
        for i in range(self.max_batch):
            self._free(i)
        self._unpicked = []
        self._publish()

    def decode(self, early=None) -> list:
        """One forward over the slots up to the highest in use (rounded up to a bucket); one
        token per live row. Plain greedy batches overlap (:meth:`_overlapped`): the results
        are the previous forward's, handed to ``early(results)`` while this forward runs where
        given (else returned)."""
        top = self._top()
        rows = self.slots[:top]
        if not any(r is not None and r.state != "done" for r in rows):
            return self._pick_unpicked()
        size = bucket(top, self.max_batch)
        view = self._view(size)
        rows = self.slots[:size]
        seqs = [r.seq if r is not None and r.state != "done" else None for r in rows]
        how = batch_pick.mode(self.engine, seqs)
        if self.overlap and batch_pick.overlaps(self.engine, how, seqs):
            return self._overlapped(how, view, rows, seqs, early)
        results = self._pick_unpicked()  # a batch that needs the host between steps: no overlap
        if results:  # those picks may have ended rows
            seqs = [r.seq if r is not None and r.state != "done" else None for r in rows]
            if not any(s is not None for s in seqs):
                return results
            how = batch_pick.mode(self.engine, seqs)
        live = np.array([[s is not None] for s in seqs], np.int64)  # the new column: who advances
        return results + self._picks(how, rows, seqs, lambda fill: self._forward(how, view, live, fill))

    def _forward(self, how: str, view, live: np.ndarray, fill=None):
        size = view.batch
        view.rows = self.lengths[:size].copy()
        out = batch_pick.forward(self.engine, how, self.pending[:size, None].copy(), live, view, fill)
        self.lengths[:size] = view.rows
        return out

    def _overlapped(self, how: str, view, rows: list, seqs: list, early=None) -> list:
        """Rows picked on the device (plain greedy: the graph's argmax; sampling rows drawn there:
        ``batch_pick.overlaps``), as vLLM's async scheduling: this forward starts on the device's
        ids of the previous one, before the host has looked at them. The step loop's
        thread runs the forward at once (ONNX Runtime releases the GIL while the device works);
        meanwhile a worker thread takes the previous forward's tokens through each row's
        ``Sequence.step`` (stop ids, lengths, the context) and hands them to ``early`` (the
        scheduler's hand-over: their text is made while the device runs). The other way round,
        the forward waited for the GIL behind the picks (up to the 5 ms switch interval) before
        it could start; at that interval it still does, the worker taking the GIL while the loop
        prepares the run, so the engine process switches threads every 0.2 ms on a device
        (``engine_core.switch_interval``). A row that those tokens end was fed one more token;
        its pick is dropped, and its KV row is free anyway."""
        live = np.array([[s is not None] for s in seqs], np.int64)
        (tokens, inputs), results = self._overlap(
            lambda: batch_pick.device_picks(how, self._forward(how, view, live), seqs), early)
        fed = [i for i, s in enumerate(seqs) if s is not None]  # the rows this forward advanced
        self.pending[fed] = tokens[fed]  # each row's next input: the token just picked on the device
        self._unpicked = [(i, rows[i], inputs[i]) for i in fed]
        return results

    def _pick_unpicked(self) -> list:
        """The overlapped forward's tokens through their rows' rules (rows that ended meanwhile, or
        whose slot another request took, get nothing)."""
        unpicked, self._unpicked = self._unpicked, []
        return [pick_row(r, inp, max_context=self.max_context) for i, r, inp in unpicked
                if self.slots[i] is r and r.state != "done"]

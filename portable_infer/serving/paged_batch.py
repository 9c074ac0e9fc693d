"""The running batch on a paged engine: a step's prefill rides in the decode forward.

With :class:`~portable_infer.engine.paged.PagedEngine` every row's KV sits in blocks of one pool,
so rows join and leave by their block tables (the caches' ``merge`` and ``take`` copy no KV) and
one forward may pack sequences of any lengths. Where a step has both a prefill (a group of whole
prompts or one prompt's chunk, as the planner made it) and rows to decode, they run as one
forward, as vLLM's chunked prefill mixes them::

    packed tokens   [ a ][ b ][ c ][ p0 p1 p2 ... p511 ]      a, b, c decode one token each;
    sequences        a    b    c    p (its chunk)             p's chunk extends p's own cache

So a burst of new prompts does not stop the running streams for whole prefill forwards: each
step still gives every running row its token. The prefill's rows are picked from the same
forward (their first tokens, where their prompts end) and join the batch after it. Tokens are
picked as :class:`RunningBatch` picks them (the graph's argmax for plain greedy steps; sampling
rows drawn on the device where the engine draws there, ``batch_pick``'s sample mode, the
prompts' last logits brought over; else the host's logits, grammar masks applied there). Prompt prefixes are shared by block reference
(:class:`PagedPrefixes`: the pool's :class:`~portable_infer.engine.kv_paged.PrefixBlocks`): a
request whose prompt starts with whole blocks computed before takes those blocks, no copy.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from portable_infer.decode import batch_pick
from portable_infer.decode.batch_pick import RowInput
from portable_infer.serving.running_batch import Prefilled, RunningBatch, pick_row

logger = logging.getLogger(__name__)


class PagedPrefixes:
    """The scheduler's prefix cache where KV is paged: prompts' whole blocks in the engine's pool,
    found by their tokens (``match``, as :class:`~portable_infer.serving.prefix_cache.PrefixCache`
    answers the planner), taken by reference (:meth:`PagedBatch.start_from_prefix`). ``enabled``
    False: nothing is indexed or matched."""

    def __init__(self, engine, enabled: bool = True):
        self.engine, self.enabled = engine, enabled

    @property
    def _blocks(self):
        return self.engine.pool.prefixes

    def match(self, prompt) -> int:
        if not self.enabled or self.engine.pool is None:
            return 0
        return len(self._blocks.match(prompt)) * self.engine.pool.block_size

    @property
    def hits(self) -> int:
        return self._blocks.hits if self.engine.pool is not None else 0

    @property
    def tokens_reused(self) -> int:
        return self._blocks.tokens_reused if self.engine.pool is not None else 0

    @property
    def nbytes(self) -> int:
        return self._blocks.nbytes if self.engine.pool is not None else 0


class PagedBatch(RunningBatch):
    """:class:`RunningBatch` over a paged engine's caches, with :meth:`mixed` steps; ``prefixes``
    a :class:`PagedPrefixes`. Plain greedy decode steps overlap the host with the device (off the
    CPU, as the slot batch's do: :meth:`_overlapped`)."""

    mixes_prefill = True  # the scheduler runs a step's prefill through mixed() with its decode
    blocks_on_demand = True  # a row takes KV blocks as it grows; the scheduler preempts when short (kv_demand.py)

    def __init__(self, engine, prefixes, max_context: int):
        super().__init__(engine, prefixes, max_context)
        self.overlap = engine.device != "cpu"  # on the CPU the picks would take the forward's cores

    def decode(self, early=None) -> list:
        seqs = [r.seq if r.state != "done" else None for r in self.rows]
        if any(seqs) and self.overlap:
            how = batch_pick.mode(self.engine, seqs)
            if batch_pick.overlaps(self.engine, how, seqs):
                return self._overlapped(how, seqs, early)
        return self._pick_unpicked() + super().decode(early)  # the host picks first: no overlap

    def _overlapped(self, how: str, seqs: list, early) -> list:
        """Rows picked on the device (plain greedy, or drawn there: ``batch_pick.overlaps``), as
        vLLM's async scheduling (the slot batch's way): this forward starts on the device's ids
        of the previous one while a worker thread takes those through their rows' rules
        (:meth:`RunningBatch._overlap`). A row those tokens end was fed one more token (its KV
        lands within what the request reserved: the ending token's own position), whose pick is
        dropped."""
        rows = self.rows
        fed = np.flatnonzero(self._advance_mask()[:, 0])

        def forward():
            if how == batch_pick.GREEDY:
                out = self.engine.forward(self.pending[:, None], self.mask, self.cache, greedy=True)
            else:
                out = self.engine.forward_on_device(self.pending[:, None], self.mask, self.cache)
            return batch_pick.device_picks(how, out, seqs)

        (tokens, inputs), results = self._overlap(forward, early)
        self.pending[fed] = tokens[fed]  # each row's next input: the token just picked on the device
        self._unpicked = [(rows[i], inputs[i]) for i in fed]
        return results

    def _pick_unpicked(self) -> list:
        """The overlapped forward's tokens through their rows' rules (rows that ended meanwhile get nothing)."""
        unpicked, self._unpicked = self._unpicked, []
        return [pick_row(r, inp, max_context=self.max_context) for r, inp in unpicked if r.state != "done"]

    def reset(self) -> None:
        super().reset()
        self._unpicked = []

    def warm_up(self, max_batch: int, prefill: int) -> None:
        """Before the first request: the decode graphs of every batch bucket, then the largest step
        the planner makes (a decode row in every slot and ``prefill`` prompt tokens packed with
        them) run once on throwaway caches, so that the device's memory pool has grown to it
        before requests wait on it (vLLM's profile run does the same)."""
        e = self.engine
        t = time.perf_counter()
        sizes = e.warm_up(max_batch)
        rows = min(max_batch, e.pool.free // 2)
        tokens = min(prefill, (e.pool.free - rows) * e.pool.block_size, e.max_context - 1)
        if rows >= 1 and tokens >= 1:
            cache = e.new_cache(rows + 1, capacity=tokens)
            e.forward_packed([(cache, i, [3]) for i in range(rows)] + [(cache, rows, [3] * tokens)], greedy=True)
            del cache  # its blocks go back
        logger.info("paged decode batch sizes %s and a step of %d rows + %d prompt tokens made ready in %.1f s",
                    sizes, rows, tokens, time.perf_counter() - t)

    def kv_after_step(self) -> list:
        """``[(request, KV tokens its row holds after the next decode forward)]`` of the live rows."""
        if self.cache is None:
            return []
        return [(r, int(n) + 1) for r, n in zip(self.rows, self.cache.rows) if r.state != "done"]

    def start_from_prefix(self, r, tokens: int, capacity: int) -> None:
        """``r`` continues from the pool's blocks of its first ``tokens`` prompt tokens (by reference)."""
        blocks = self.engine.pool.prefixes.match(r.ids, touch=True)
        if len(blocks) * self.engine.pool.block_size != tokens:  # planned moments ago: a bug
            raise RuntimeError(f"the KV pool holds {len(blocks)} blocks of request {r.id}'s prompt, the plan said "
                               f"{tokens} tokens")
        cache = self.engine.new_cache(1, capacity=capacity)
        cache.share(0, blocks)
        cache.length = tokens
        self._partial[r.id] = cache

    def _remember(self, prompts: list, cache) -> None:
        """Index the prompts' whole blocks for later requests (no copy: the blocks themselves)."""
        if self.prefixes.enabled:
            for i, p in enumerate(prompts):
                self.engine.pool.prefixes.publish(p, cache.tables[i])

    def mixed(self, rows: list, step) -> tuple:
        """One forward for the batch's live rows (one token each) and ``step``'s prefill (a
        :class:`~portable_infer.serving.scheduler_plan.Prefill`, ``rows`` its requests in slice
        order). Returns ``(results, done)``: the decode rows' :class:`RowResult` list (an overlapped
        step's before them) and, where prompts ended, their :class:`Prefilled` (first tokens
        picked; to join), else None."""
        before = self._pick_unpicked()  # the host picks the last overlapped step's tokens first
        decode = np.flatnonzero(self._advance_mask()[:, 0]).tolist()
        cache, mask, chunks = self._prefill_chunks(rows, step)
        seqs = [r.seq if r.state != "done" else None for r in self.rows]
        fresh = [r.seq for r in rows if r.state != "done"]
        how = batch_pick.mode(self.engine, seqs + fresh)
        how = how if how in (batch_pick.GREEDY, batch_pick.SAMPLE) else batch_pick.HOST
        packed = [(self.cache, i, [int(self.pending[i])]) for i in decode] + chunks
        self.cache.length += 1
        out = {}

        def forward(fill):  # the decode rows' part, as row_inputs reads it; the prefill's kept in out
            n = len(decode)
            if how == batch_pick.SAMPLE:  # every row's picks where the logits are (the prompts' first tokens too)
                logits, _ = self.engine.forward_packed(packed, on_device=True)
                out["device"] = logits.view(np.arange(n, len(packed)))
                index = np.full(len(self.rows), -1, np.int64)
                index[decode] = np.arange(n)
                return logits.view(index)
            logits, token = self.engine.forward_packed(packed, how == batch_pick.GREEDY)  # timed by its caller
            out["logits"], out["token"] = (None if logits is None else logits[n:]), token[n:]
            part = token[:n] if how == batch_pick.GREEDY else logits[:n]
            if n == len(self.rows):  # every row decodes: no copy (the vocab-wide rows are large)
                return part
            full = np.zeros((len(self.rows), *part.shape[1:]), part.dtype)
            full[decode] = part
            return full

        results = self._picks(how, self.rows, seqs, forward) if decode else self._prefill_only(forward)
        return before + results, self._first_tokens(rows, step, cache, mask, out)

    def _prefill_only(self, forward) -> list:
        self._wait(forward, None)
        return []

    def _prefill_chunks(self, rows: list, step) -> tuple:
        """``(cache, mask, chunks)`` of ``step``: whole prompts in a cache of their own (``grouped``),
        or one prompt's next chunk on its partial cache."""
        if step.grouped:
            width = max(r.prompt_len for r in rows)
            mask = np.zeros((len(rows), width), np.int64)
            for i, r in enumerate(rows):
                mask[i, width - r.prompt_len:] = 1
            cache = self.engine.new_cache(len(rows), capacity=step.capacity)
            cache.length = width
            return cache, mask, [(cache, i, r.ids) for i, r in enumerate(rows)]
        (r,), (s,) = rows, step.slices
        cache = self._partial.pop(r.id, None) or self.engine.new_cache(1, capacity=step.capacity)
        if cache.length != s.start:
            raise RuntimeError(f"request {r.id} holds {cache.length} tokens of KV; the plan prefills from {s.start}")
        cache.length = s.end
        return cache, np.ones((1, s.end), np.int64), [(cache, 0, r.ids[s.start:s.end])]

    def _first_tokens(self, rows: list, step, cache, mask, out: dict) -> Prefilled | None:
        """The prefill's end: a chunk with more to go keeps its cache; prompts that ended get
        their first tokens (the rows not ended meanwhile)."""
        if not step.grouped and not step.slices[0].last:
            self._partial[rows[0].id] = cache
            return None
        self._remember([r.ids for r in rows], cache)
        seqs = [r.seq if r.state != "done" else None for r in rows]  # (done: cancelled while prefilling)
        if "device" in out:
            inputs = batch_pick.row_inputs(batch_pick.SAMPLE, out["device"], seqs, None)
        elif out["logits"] is None:
            inputs = [RowInput(tok=int(t)) for t in out["token"]]
        else:
            inputs = [RowInput(x) for x in out["logits"]]
        results = [pick_row(r, inputs[i], max_context=self.max_context) for i, r in enumerate(rows) if seqs[i] is not None]
        return Prefilled(rows, cache, mask, results)

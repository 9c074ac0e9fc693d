"""The engine for ``growth: paged`` graphs: a step's tokens packed, the KV in a pool of blocks.

It implements the same :class:`~portable_infer.engine.protocols.Engine` as the others
(``new_cache``, ``forward(ids, mask, cache)`` with the decode loop's left-padded, growing mask),
with :class:`~portable_infer.engine.kv_paged.PagedCache` for its caches. Inside, a forward packs
each row's new tokens (the mask's last columns) one sequence after another, as the graph takes
them (``exporters/lowering/paged.py``)::

    ids [B, S], mask [B, length + S]  ─> rows with new tokens: n_b = mask[b, -S:].sum()
    input_ids [1, Σ n_b]   cumulative_sequence_length [N + 1]   past_seqlens = cache.rows
    block_table [N, widest]  (-1 past a row's blocks)   logits_index = each row's last token

so a step may hold prefills of any lengths and one-token decodes side by side
(:meth:`forward_packed`: the scheduler's mixed steps), with no padding computed and no KV moved.
Rows without new tokens sit the step out (their logits are zeros, their token 0). The pools are
bound as both past and present on one IO binding (the graph writes in place); the other inputs
are bound at each step. Decode steps (one token a row) run on fixed buffers per batch bucket and,
on CUDA, as captured CUDA graphs (:mod:`~portable_infer.engine.paged_graphs`; the session must
have taken graph capture); steps with longer runs (prefills, mixed steps) run plain.
"""

from __future__ import annotations

import logging

import numpy as np

from portable_infer.engine.checks import check_call, check_capacity, checked_capacity
from portable_infer.engine.cuda_graphs import run_options
from portable_infer.engine.device_logits import DeviceLogits
from portable_infer.engine.device_sample import DrawsOnDevice
from portable_infer.engine.devices import device_of
from portable_infer.engine.kv_alloc import KVBuffers
from portable_infer.engine.kv_paged import BlockPool, PagedCache, fill_tables
from portable_infer.engine.paged_graphs import DecodeGraphs
from portable_infer.errors import InvalidArgumentError, PortableInferError
from portable_infer.package import manifest as mf

logger = logging.getLogger(__name__)
BLOCK_SIZE = 16  # tokens a block holds (vLLM's default); PagedEngine(block_size=) changes it
# ... and by device, where it measured faster: on CUDA, PagedAttention took 1.44 ms a step for the
# attention of 256 decode rows at 128 against 4.22 at 16, and a decode step of 256 rows with 16 new
# 128-token prompts packed in 77 ms against 263 (H200, Llama-3.1-8B shape; docs/benchmarks.md, Session 18)
BLOCK_SIZES = {"cuda": 128}


def block_size_for(device: str) -> int:
    """Tokens a pool block holds on ``device`` (the engines' and the scheduler's default)."""
    return BLOCK_SIZES.get(device, BLOCK_SIZE)


class HostLogits:
    """A paged forward's logits on the host, behind :class:`~portable_infer.engine.device_logits.DeviceLogits`'
    reading verbs (no masks applied on the device: ``masks_here`` False)."""

    masks_here = False

    def __init__(self, logits: np.ndarray, token: np.ndarray):
        self.logits, self.token = logits, token
        self.batch, self.vocab = logits.shape

    def argmax(self) -> np.ndarray:
        return self.token.copy()

    def rows(self, index) -> np.ndarray:
        return self.logits[np.asarray(index, np.int64)]


class PagedEngine(DrawsOnDevice, KVBuffers):
    """Runs a paged-KV graph. Implements :class:`~portable_infer.engine.protocols.Engine`.

    Args:
        session, variant, provider, ort: the session and its manifest variant.
        max_context, vocab_size: the model's.
        block_size: tokens a block holds.
    """

    masks_on_device = False  # the logits come to the host for grammar masks
    overlaps_host = False

    def __init__(self, session, variant: mf.GraphVariant, provider: str, ort, *, max_context: int,
                 vocab_size: int, block_size: int | None = None, cuda_graph: bool = False):
        if variant.kv.growth != "paged":
            raise PortableInferError(f"variant {variant.name} keeps its KV as {variant.kv.growth}; it is not paged")
        self.session, self.variant, self.provider, self.ort = session, variant, provider, ort
        self.device = device_of(provider)
        self.max_context, self.vocab = max_context, vocab_size
        self.block_size = block_size or block_size_for(self.device)
        self.greedy_on_device = mf.NEXT_TOKEN in {o.name for o in session.get_outputs()}
        self.pool: BlockPool | None = None
        self._grows = False  # the pool was sized by a first cache, not reserved: it grows when short
        self._binding = None
        self._plain = run_options(ort, self.device, -1)  # no graph (a session that captures needs it said)
        self.graphs = DecodeGraphs(self, capture=True) if cuda_graph and self.device == "cuda" else None
        self.start_device_draws()

    def decode_graphs(self, capture: bool) -> None:
        """Decode steps on fixed buffers per batch bucket, captured as CUDA graphs with ``capture``
        (the session must allow it); from the next :meth:`reserve` on (the pool needs its spare block)."""
        self.graphs = DecodeGraphs(self, capture=capture and self.device == "cuda")

    def warm_up(self, max_batch: int) -> list:
        """The decode graphs of every batch bucket up to ``max_batch`` made before the first request
        (a reserved pool only); returns the sizes."""
        if self.graphs is None or self.pool is None or self._grows:
            return []
        return self.graphs.warm_up(max_batch)

    # --- the pool ---------------------------------------------------------------------------------
    def reserve(self, blocks: int, block_size: int | None = None, *, grows: bool = False) -> BlockPool:
        """A pool of ``blocks`` blocks of ``block_size`` tokens (None: the engine's): the
        scheduler's KV budget. Without it the first cache sizes the pool; a pool that caches hold
        blocks of is not replaced (its indexed prefixes go)."""
        if self.pool is not None:
            self.pool.prefixes.evict(self.pool.blocks)
        if self.pool is not None and self.pool.refs.any():
            raise PortableInferError("the KV pool holds caches' blocks; drop them before reserving another pool")
        self.block_size = block_size or self.block_size
        self.pool, self._binding = None, None  # the old pool's memory goes before the new one is made
        if self.graphs is not None:
            self.graphs.reset()
        self.pool = BlockPool(self.variant.kv, self.ort, self.device, blocks, self.block_size,
                              spare=self.graphs is not None and not grows, make=self.kv_buffer)
        self._grows = grows
        return self.pool

    def new_cache(self, batch: int, capacity: int | None = None) -> PagedCache:
        capacity = checked_capacity(capacity, self.max_context)
        if self.pool is None:
            self.reserve(-(-batch * capacity // self.block_size), grows=True)
        return PagedCache.empty(self.pool, self.variant.kv, batch, capacity)

    def trim(self, dropped_bytes: int) -> None:
        """Nothing to give back: the pool stays for the next caches."""

    # --- one step ---------------------------------------------------------------------------------
    def forward(self, ids: np.ndarray, mask: np.ndarray, cache: PagedCache, *, greedy: bool = False,
                all_logits: bool = False) -> np.ndarray:
        """``ids`` [B, S], ``mask`` [B, length + S]: logits [B, vocab] of each row's last new token
        (``greedy``: its argmax [B] instead); see the module's docstring."""
        check_call(self, greedy, all_logits)
        logits, token = self._forward(ids, mask, cache, greedy)
        return token if greedy else logits

    def forward_on_device(self, ids: np.ndarray, mask: np.ndarray, cache: PagedCache,
                          meanwhile=None) -> HostLogits | DeviceLogits:
        """:meth:`forward`, the logits and the graph's argmax together: left on the device where
        the engine draws there (``samples_on_device``: a
        :class:`~portable_infer.engine.device_logits.DeviceLogits` that draws and fetches rows),
        else on the host (this engine masks there); ``meanwhile()`` runs after the run."""
        chunks = self._chunks(ids, mask, cache)
        if self.samples_on_device and chunks:
            logits, _ = self.forward_packed(chunks, on_device=True)
            cache.length += ids.shape[1]
            index = np.full(len(ids), -1, np.int64)
            index[[b for _, b, _ in chunks]] = np.arange(len(chunks))
            out = logits.view(index)
        else:
            out = HostLogits(*self._forward(ids, mask, cache, False, chunks))
        if meanwhile is not None:
            meanwhile()
        return out

    @staticmethod
    def _chunks(ids: np.ndarray, mask: np.ndarray, cache: PagedCache) -> list:
        """``[(cache, row, its new tokens)]`` of the rows with new tokens (the mask's last columns)."""
        S = ids.shape[1]
        new = np.asarray(mask[:, -S:], np.int64).sum(axis=1)
        return [(cache, b, ids[b, S - int(new[b]):]) for b in range(len(ids)) if new[b]]

    def _forward(self, ids: np.ndarray, mask: np.ndarray, cache: PagedCache, greedy: bool, chunks=None) -> tuple:
        B, S = ids.shape
        chunks = self._chunks(ids, mask, cache) if chunks is None else chunks
        out = self.forward_packed(chunks, greedy) if chunks else (None, None)
        cache.length += S
        if len(chunks) == B:  # every row has new tokens: the step's own arrays (no vocab-wide copy)
            return out
        token = np.zeros(B, np.int64)
        logits = None if greedy else np.zeros((B, self.vocab), np.float32)
        live = [b for _, b, _ in chunks]
        if chunks:
            token[live] = out[1]
            if not greedy:
                logits[live] = out[0]
        return logits, token

    def forward_packed(self, chunks: list, greedy: bool = False, on_device: bool = False) -> tuple:
        """One forward of ``chunks`` [(cache, row, token ids)] (rows of any of this engine's
        caches, each at most once, any number of tokens each): ``(logits [N, vocab], or None
        with greedy; argmax [N])`` in chunk order; ``on_device``: the logits left on the device,
        a :class:`~portable_infer.engine.device_logits.DeviceLogits` of the N rows (valid until
        the next forward) that draws and fetches rows. Each row's ``cache.rows`` advances by its tokens
        (``cache.length``, the caller's mask, does not)."""
        want = "device" if on_device else "token" if greedy else "logits"
        pool, n_rows = self.pool, len(chunks)  # per-row work in numpy: 256 rows a step on GPUs
        counts = np.fromiter((len(t) for _, _, t in chunks), np.int64, n_rows)
        past = np.fromiter((c.rows[b] for c, b, _ in chunks), np.int64, n_rows)
        ends = past + counts
        over = ends > np.fromiter((c.capacity for c, _, _ in chunks), np.int64, n_rows)
        if over.any():
            k = int(np.argmax(over))
            check_capacity(ends[k:k + 1], chunks[k][0].capacity)
        tables = [c.tables[b] for c, b, _ in chunks]
        held = np.fromiter(map(len, tables), np.int64, n_rows)
        short = np.flatnonzero(-(-ends // pool.block_size) > held)  # rows that need blocks
        need = int((-(-ends[short] // pool.block_size) - held[short]).sum())
        if need > pool.free and self._grows:
            pool.grow(max(2 * pool.blocks, pool.blocks + need))
            self._binding = None
        writes = np.flatnonzero(past // pool.block_size < held)  # into a block the row holds already
        if writes.size and (pool.refs[[tables[k][past[k] // pool.block_size] for k in writes]] > 1).any():
            raise PortableInferError("a KV block two caches hold would be written; drop the old cache first")
        for k in short:
            pool.extend(tables[k], int(ends[k]))
        held[short] = [len(tables[k]) for k in short]
        step = None
        if self.graphs is not None and not self._grows and (counts == 1).all():
            step = self.graphs.step_for(n_rows, int(held.max()))
        if step is not None:
            ids = np.fromiter((t[0] for _, _, t in chunks), np.int64, n_rows)
            logits, token = self.graphs.run(step, ids, past.astype(np.int32), tables, held, want)
        else:
            logits, token = self._packed(chunks, counts, past, tables, held, want)
        for (c, b, _), n in zip(chunks, counts.tolist()):
            c.rows[b] += n
        if on_device:
            logits = DeviceLogits(logits, token, sampler=self.device_sampler, index=np.arange(n_rows))
        return logits, token

    def _packed(self, chunks: list, counts: np.ndarray, past: np.ndarray, tables: list, held: np.ndarray,
                want: str) -> tuple:
        """A plain step of any runs (the feeds bound at this step)."""
        n_rows = len(chunks)
        table = np.empty((n_rows, int(held.max())), np.int32)
        fill_tables(table, tables, held)  # row after row, as the mask's order
        cu = np.zeros(n_rows + 1, np.int32)
        np.cumsum(counts, out=cu[1:])
        feeds = {mf.INPUT_IDS: np.concatenate([np.asarray(t, np.int64) for _, _, t in chunks])[None],
                 mf.CUMULATIVE_SEQUENCE_LENGTH: cu, mf.PAST_SEQLENS: past.astype(np.int32),
                 mf.BLOCK_TABLE: table, mf.LOGITS_INDEX: cu[1:].astype(np.int64) - 1,
                 mf.ATTENTION_METADATA: np.array([counts.max(), (past + counts).max()], np.int32)}
        return self._run(feeds, want)

    def _run(self, feeds: dict, want: str) -> tuple:
        b = self._bound()
        for name, value in feeds.items():
            b.bind_cpu_input(name, value)
        b.bind_output(mf.LOGITS, "cpu" if want == "logits" else self.device)
        b.bind_output(mf.NEXT_TOKEN, "cpu")
        self.session.run_with_iobinding(b, self._plain)
        *_, logits, token = b.get_outputs()  # in binding order: the pools first (bound once)
        token = token.numpy().reshape(-1)
        if want == "logits":
            return logits.numpy()[:, 0], token
        return (logits if want == "device" else None), token

    def _bound(self):
        """The IO binding with the pools bound in place (made once per pool)."""
        if self._binding is None:
            if not self.greedy_on_device:
                raise InvalidArgumentError(f"graph {self.variant.file} has no {mf.NEXT_TOKEN} output; re-export it")
            b = self.session.io_binding()
            self.bind_pools(b)
            self._binding = b
        return self._binding

    def bind_pools(self, b) -> None:
        """Bind every layer's pool to ``b`` as both past and present (written in place)."""
        for (kn, vn), (kp, vp), (k, v) in zip(self.variant.kv.past, self.variant.kv.present, self.pool.values):
            b.bind_ortvalue_input(kn, k)
            b.bind_ortvalue_input(vn, v)
            b.bind_ortvalue_output(kp, k)
            b.bind_ortvalue_output(vp, v)

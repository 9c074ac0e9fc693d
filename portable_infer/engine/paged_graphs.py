"""CUDA graphs for a paged engine's decode steps (one new token a row), as vLLM captures its
decode batch sizes.

A step of ``n`` rows runs as a step of ``B = bucket(n)`` rows on device buffers fixed per
``(B, W)`` (``W``: the block table's width, the step's widest row rounded up to a power of two
blocks, at least ``KV_MIN`` tokens), and the graph captured on them replays with no kernel
launched from the host::

    input_ids [1, B]                  the rows' tokens, then 0 for the B - n padding rows
    cumulative_sequence_length [B+1]  0, 1, ..., B (one token a row: set once)
    past_seqlens [B]                  the rows' KV lengths, then 0
    block_table [B, W]                the rows' blocks (-1 past them); padding rows: the spare block
    logits_index [B]                  0, 1, ..., B - 1 (set once)
    attention_metadata [2]            host, fixed at capture: [1, W * block_size], the bounds
                                      PagedAttention sizes its launches by (it reads every
                                      row's own length on the device, so a replay stays exact)

Padding rows write their token's keys and values into the pool's spare block, which no row
holds. Only the three per-step inputs are copied in before a replay. Without CUDA graphs (the
CPU's tests) the same fixed buffers run as plain steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from portable_infer.engine import cuda_graphs
from portable_infer.engine.kv_paged import fill_tables
from portable_infer.package import manifest as mf

logger = logging.getLogger(__name__)
KV_MIN = 512  # tokens: the narrowest block table a decode graph is made for
MAX_GRAPHS = 64  # (batch, width) shapes with buffers and a graph; steps of other shapes run plain


@dataclass
class _Step:
    """One (batch, width) shape's host arrays, device buffers, binding and graph."""

    ids: np.ndarray  # [1, B] int64
    past: np.ndarray  # [B] int32
    table: np.ndarray  # [B, W] int32
    values: dict  # input name -> its OrtValue (the three above, and the two fixed ones)
    logits: object  # [B, 1, vocab] float32 OrtValue
    token: object  # [B, 1] int64 OrtValue
    binding: object
    options: object  # run options naming its graph (-1: none)


class DecodeGraphs:
    """The decode steps of ``engine`` (a :class:`~portable_infer.engine.paged.PagedEngine` whose
    pool has a spare block) on fixed buffers; ``capture``: as CUDA graphs."""

    def __init__(self, engine, capture: bool):
        self.engine, self.capture = engine, capture
        self.limit = cuda_graphs.BUCKETS[-1]  # the largest batch run this way (warm_up sets max_batch)
        self.steps: dict = {}
        self.failed = False

    def reset(self) -> None:
        """Forget every shape (the pool was made again: the bindings name the old one)."""
        self.steps = {}

    def width(self, blocks: int) -> int:
        """The table width for rows of at most ``blocks`` blocks (None-like 0 when none fits)."""
        bs, ctx = self.engine.block_size, self.engine.max_context
        most = -(-ctx // bs)
        w = max(-(-KV_MIN // bs), 1 << max(blocks - 1, 0).bit_length())
        return min(w, most) if blocks <= most else 0

    def step_for(self, rows: int, blocks: int) -> _Step | None:
        """The fixed step a decode step of ``rows`` rows, the widest holding ``blocks`` blocks, runs
        on (made now if new), or None: it runs plain."""
        width = self.width(blocks)
        if self.failed or rows > self.limit or self.engine.pool.spare is None or not width:
            return None  # (a pool made before the graphs has no spare block for padding rows)
        key = (cuda_graphs.bucket(rows, self.limit), width)
        if key not in self.steps and len(self.steps) >= MAX_GRAPHS:
            return None
        return self._step(*key)

    def run(self, step: _Step, ids: np.ndarray, past: np.ndarray, tables: list, held: np.ndarray,
            want: str) -> tuple:
        """``step`` (:meth:`step_for`) for rows with tokens ``ids`` [n], KV lengths ``past`` [n] and
        blocks ``tables`` (``held`` [n] of them each): ``(logits, argmax [n])``, the logits as
        ``want`` says: "logits" [n, vocab] on the host, "token" None, "device" the step's own
        buffer [B, 1, vocab] (its first n rows; valid until the step runs again)."""
        n = len(ids)
        step.ids[0, :n], step.ids[0, n:] = ids, 0
        step.past[:n], step.past[n:] = past, 0
        step.table[n:] = self.engine.pool.spare  # padding rows: a real row's blocks may be left from a wider step
        fill_tables(step.table[:n], tables, held)
        self._go(step)
        own = np.copy if self.engine.device == "cpu" else np.asarray  # numpy() of a CPU buffer is a view of it
        token = own(step.token.numpy().reshape(-1)[:n])
        if want == "logits":
            return own(step.logits.numpy()[:n, 0]), token
        return (step.logits if want == "device" else None), token

    def warm_up(self, max_batch: int) -> list:
        """Every bucket up to ``max_batch`` made (and captured) at the narrowest width before the
        first request, as the slot batch does; only padding rows run. Returns the sizes."""
        self.limit = max_batch
        sizes = sorted({cuda_graphs.bucket(n, max_batch) for n in range(1, max_batch + 1)})
        width = self.width(1)
        for size in sizes:
            step = self._step(size, width)
            for _ in range(3):  # ONNX Runtime runs a new graph id plainly before it captures it
                if self.failed:
                    return []
                self._go(step)
        return sizes

    # --- inside -------------------------------------------------------------------------------------
    def _step(self, rows: int, width: int) -> _Step:
        step = self.steps.get((rows, width))
        if step is None:
            step = self.steps[(rows, width)] = self._make(rows, width)
        return step

    def _make(self, rows: int, width: int) -> _Step:
        e = self.engine
        ort, device = e.ort, e.device
        ids = np.zeros((1, rows), np.int64)
        past = np.zeros(rows, np.int32)
        table = np.full((rows, width), e.pool.spare, np.int32)
        fixed = {mf.CUMULATIVE_SEQUENCE_LENGTH: np.arange(rows + 1, dtype=np.int32),
                 mf.LOGITS_INDEX: np.arange(rows, dtype=np.int64)}
        values = {name: ort.OrtValue.ortvalue_from_numpy(a, device, 0)
                  for name, a in ((mf.INPUT_IDS, ids), (mf.PAST_SEQLENS, past), (mf.BLOCK_TABLE, table), *fixed.items())}
        logits = ort.OrtValue.ortvalue_from_shape_and_type([rows, 1, e.vocab], np.float32, device, 0)
        token = ort.OrtValue.ortvalue_from_shape_and_type([rows, 1], np.int64, device, 0)
        b = e.session.io_binding()
        e.bind_pools(b)
        for name, v in values.items():
            b.bind_ortvalue_input(name, v)
        b.bind_cpu_input(mf.ATTENTION_METADATA, np.array([1, width * e.block_size], np.int32))
        b.bind_ortvalue_output(mf.LOGITS, logits)
        b.bind_ortvalue_output(mf.NEXT_TOKEN, token)
        graph = cuda_graphs.new_graph_id() if self.capture else -1
        return _Step(ids, past, table, values, logits, token, b, cuda_graphs.run_options(ort, device, graph))

    def _go(self, step: _Step) -> None:
        for name, host in ((mf.INPUT_IDS, step.ids), (mf.PAST_SEQLENS, step.past), (mf.BLOCK_TABLE, step.table)):
            step.values[name].update_inplace(host)
        try:
            self.engine.session.run_with_iobinding(step.binding, step.options)
        except Exception as exc:  # noqa: BLE001 - capture refused: the steps run plain from now on
            if not self.capture:
                raise
            logger.warning("CUDA graph capture of paged decode steps failed (%s); running them without", exc)
            self.failed, self.capture = True, False
            step.options = cuda_graphs.run_options(self.engine.ort, self.engine.device, -1)
            self.engine.session.run_with_iobinding(step.binding, step.options)

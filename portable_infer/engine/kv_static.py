"""The KV cache of ``growth: static`` graphs: fixed buffers written in place, and its row operations.

Each row keeps its tokens from index 0 of a ``[batch, kv_heads, capacity, head_dim]`` buffer and
its own length (``rows``); the graph writes each new token in place (past and present are one
buffer), so a decode step copies no KV at all, where a growing cache copies all of it every step.
The buffers belong to the :class:`~portable_infer.engine.static.StaticEngine` that made the cache
(pooled per shape, CUDA graphs captured on them). Joining or leaving copies the rows that stay into
buffers of the new batch size, once::

    batch (capacity 256)           newcomer              merged (capacity 256)
    row 0: t t t t . . .           row: t t . . .   ->   row 0: t t t t . . .
    row 1: t t t t t t .                                 row 1: t t t t t t .
                                                         row 2: t t . . . . .

Off the CPU the rows move on the device (:class:`~portable_infer.engine.rows.RowMover`), not
through the host. The caller's left-padded mask is kept as it is for its width
(:mod:`~portable_infer.engine.padding`); the engine reads each row's length from ``rows``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from portable_infer.package.manifest import KVLayout
from portable_infer.engine import padding
from portable_infer.engine.memory import bytes_per_token

# OrtValue.numpy() is a view of the value's memory on the CPU (writable, no copy) and a host
# copy on other devices.


def write(value, dtype, fill) -> None:
    """``fill(array)`` writes into ``value``: in place on the CPU, through a host copy elsewhere
    (a fallback: devices move rows with a RowMover)."""
    if value.device_name() == "cpu":
        fill(value.numpy())
        return
    out = value.numpy()  # the rows it does not fill (other views' rows) are kept
    fill(out)
    value.update_inplace(out)


@dataclass
class StaticCache:
    """Per-layer (key, value) buffers and how many tokens each row holds; see
    :class:`~portable_infer.engine.protocols.KVCache`."""

    layout: KVLayout
    batch: int
    capacity: int
    values: list  # [(key OrtValue, value OrtValue)] [B, KVH, capacity, D]
    rows: np.ndarray = None  # tokens held per row
    length: int = 0  # caller-facing: columns of the (left-padded) mask seen so far
    graph_id: int = -1  # the CUDA graph this cache's buffers belong to (-1: none)
    slot: object = field(default=None, repr=False)  # the engine's buffers, binding and graph this cache runs on
    engine: object = field(default=None, repr=False, compare=False)  # the StaticEngine that made it
    start: int = 0  # a view (StaticEngine.view): its rows are rows [start, start + batch) of ``values``
    owner: object = field(default=None, repr=False, compare=False)  # a view's buffer (kept alive by it)

    @property
    def whole(self) -> bool:
        """Whether this cache is all of its buffers' rows (not a view of some of them)."""
        return self.start == 0 and self.batch == self.values[0][0].shape()[0]

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.layout)

    def reserved_nbytes(self) -> int:
        """The buffers' size: batch x capacity tokens (virtual memory on the CPU)."""
        return self.batch * self.capacity * self.bytes_per_token

    def nbytes(self) -> int:
        """KV bytes the buffers really hold. On the CPU a fresh buffer's pages are committed when
        first written, so this counts the positions written so far per row (in these buffers by
        any cache that used them): what the resident memory grew by, not the virtual
        ``reserved_nbytes`` (a 2.8 GiB reservation held 41 MB). Device allocators commit the whole
        buffer at once: there it is ``reserved_nbytes``."""
        if self.slot is None or self.slot.written is None:
            return self.reserved_nbytes()
        return int(self.slot.written.sum()) * self.bytes_per_token

    def mark_written(self, upto) -> None:
        """Rows' positions ``[0, upto)`` now hold data (``upto``: per row, or one int for all)."""
        slot = self.slot
        if slot is not None and slot.written is not None:
            np.maximum(slot.written, np.minimum(upto, self.capacity), out=slot.written)

    # --- rows joining and leaving ----------------------------------------------------------------
    def merge(self, mask: np.ndarray, other: "StaticCache", other_mask: np.ndarray) -> tuple:
        """Rows of ``other`` under these in new buffers of the larger capacity; ``(cache, mask)``."""
        out = self.engine.new_cache(self.batch + other.batch, capacity=max(self.capacity, other.capacity))
        copy_rows(out, [(self, np.arange(self.batch)), (other, np.arange(other.batch))])
        out.rows = np.concatenate([self.rows, other.rows])
        out.length = max(self.length, other.length)
        return out, padding.stack(mask, self.length, other_mask, other.length)

    def take(self, mask: np.ndarray, keep: list) -> tuple:
        """Rows ``keep`` (in that order) in new buffers; ``(cache, mask)``."""
        sub, start = padding.keep_rows(mask, keep)
        idx = np.asarray(keep, np.int64)
        out = self.engine.new_cache(len(keep), capacity=self.capacity)
        copy_rows(out, [(self, idx)])
        out.rows = self.rows[idx].copy()
        out.length = self.length - start
        return out, sub

    def prompt_kv(self, prompts: list, rows: list) -> list:
        """Row i holds ``prompts[i]`` from token 0. Off the CPU only those rows' prompt tokens
        leave the device."""
        mover = self.engine.row_mover()
        at = self.start
        if mover is not None:
            keep = max(len(prompts[i]) for i in rows)
            fetched = [tuple(mover.fetch(x, [at + i for i in rows], keep) for x in pair) for pair in self.values]
            return [[(k[j:j + 1, :, :len(prompts[i])], v[j:j + 1, :, :len(prompts[i])]) for k, v in fetched]
                    for j, i in enumerate(rows)]
        arrays = [(k.numpy(), v.numpy()) for k, v in self.values]  # the prefix cache copies what it keeps
        return [[(k[at + i:at + i + 1, :, :len(prompts[i])], v[at + i:at + i + 1, :, :len(prompts[i])])
                 for k, v in arrays] for i in rows]

    def fill_prefix(self, arrays: list, n: int) -> None:
        dtype = np.dtype(self.layout.dtype)
        for (dk, dv), (k, v) in zip(self.values, arrays):
            for d, x in ((dk, k), (dv, v)):
                write(d, dtype, lambda out, x=x: out.__setitem__((slice(None), slice(None), slice(0, n)), x))
        self.rows = np.array([n], np.int64)
        self.length = n
        self.mark_written(self.rows)


def target_runs(at) -> list:
    """Indices into ``at`` (target rows) grouped into runs of consecutive targets, in target order:
    each run is one copy per buffer (its output bound to those rows)."""
    order = np.argsort(at, kind="stable")
    runs, start = [], 0
    for k in range(1, len(order) + 1):
        if k == len(order) or at[order[k]] != at[order[k - 1]] + 1:
            runs.append(order[start:k])
            start = k
    return runs


def move_rows(dst: StaticCache, src: StaticCache, rows, at) -> None:
    """Rows ``rows`` of ``src`` into rows ``at`` of ``dst`` (both relative to each cache: views
    from their ``start``), one copy per buffer for each run of consecutive targets (on the engine's
    device where it has a row mover: GPUs; else through numpy). ``src`` may be ``dst``: a run reads
    all its rows before writing any, so one run may overlap its own targets (a compaction moves
    every live row into ``[0, count)`` in one run), but several runs may not read rows that
    another writes. The rows of ``dst`` not named keep their values."""
    rows, at = np.asarray(rows, np.int64), np.asarray(at, np.int64)
    if rows.shape != at.shape or len(np.unique(at)) != len(at):
        raise ValueError(f"moving rows {rows.tolist()} into {at.tolist()}: one distinct target a row")
    runs = target_runs(at)
    if src.values is dst.values and len(runs) > 1 and (set((rows + src.start).tolist()) & set((at + dst.start).tolist())):
        raise ValueError(f"rows {rows.tolist()} move onto each other's places in {len(runs)} runs")
    for run in runs:
        start = int(at[run[0]])
        copy_rows(dst.engine.view(dst, start, len(run)) if (start, len(run)) != (0, dst.batch) else dst,
                  [(src, rows[run])])


def copy_rows(dst: StaticCache, parts: list) -> None:
    """Write ``parts`` [(cache, row indices)] one after another into ``dst``'s rows: tokens
    ``[0, rows)`` of each (what the graph reads; the rest of a row is never read). Views (of
    either side) are rows of their buffers from their ``start``. On the engine's device where it
    has a row mover (GPUs), else through numpy."""
    mover = dst.engine.row_mover()
    parts = [(c, np.asarray(idx, np.int64)) for c, idx in parts]
    used = [int(c.rows[idx].max()) if len(idx) else 0 for c, idx in parts]  # tokens held, per part
    if mover is not None:
        for layer, pair in enumerate(dst.values):
            for j, d in enumerate(pair):
                at = dst.start
                for (c, idx), n in zip(parts, used):
                    if len(idx):
                        mover.copy(c.values[layer][j], idx + c.start, d, at, used=n)
                    at += len(idx)
        return
    dst.mark_written(np.repeat(used, [len(idx) for _, idx in parts]))
    dtype = np.dtype(dst.layout.dtype)
    for layer, pair in enumerate(dst.values):
        for j, d in enumerate(pair):
            def fill(out, layer=layer, j=j):
                at = dst.start
                for (c, idx), n in zip(parts, used):
                    out[at:at + len(idx), :, :n] = c.values[layer][j].numpy()[idx + c.start, :, :n]
                    at += len(idx)
            write(d, dtype, fill)

"""Rows joining and leaving a batch whose KV lives in fixed buffers (``growth: static`` graphs).

The continuous-batching scheduler's verbs of :mod:`portable_infer.kvblocks`, for
:class:`~portable_infer.static_engine.StaticCache`. Each row keeps its tokens from index 0 of a
``[batch, kv_heads, capacity, head_dim]`` buffer and its own length (``cache.rows``); the graph
writes each new token in place (past and present are one buffer), so a decode step copies no KV
at all, where a growing cache copies all of it every step. Joining or leaving copies the rows
that stay into buffers of the new batch size, once::

    batch (capacity 256)           newcomer              merged (capacity 256)
    row 0: t t t t . . .           row: t t . . .   ->   row 0: t t t t . . .
    row 1: t t t t t t .                                 row 1: t t t t t t .
                                                         row 2: t t . . . . .

Off the CPU the rows move on the device (:mod:`portable_infer.kvmove`), not through the host.
The scheduler's left-padded mask is kept as it is for its width (what the engine's callers see);
the engine reads each row's length from ``cache.rows``.
"""

from __future__ import annotations

import numpy as np

# OrtValue.numpy() is a view of the value's memory on the CPU (writable, no copy) and a host
# copy on other devices.


def write(value, dtype, fill) -> None:
    """``fill(array)`` writes into ``value``: in place on the CPU, through a host copy elsewhere."""
    if value.device_name() == "cpu":
        fill(value.numpy())
        return
    out = np.zeros(value.shape(), dtype=dtype)
    fill(out)
    value.update_inplace(out)


def _copy_rows(engine, dst, parts: list) -> None:
    """Write ``parts`` [(cache, row indices)] one after another into ``dst``'s rows: tokens
    ``[0, rows)`` of each (what the graph reads; the rest of a row is never read). On the
    engine's device where it has a row mover (GPUs), else through numpy."""
    mover = engine.row_mover()
    if mover is not None:
        for layer, pair in enumerate(dst.values):
            for j, d in enumerate(pair):
                at = 0
                for c, idx in parts:
                    if len(idx):
                        mover.copy(c.values[layer][j], idx, d, at)
                    at += len(idx)
        return
    used = [int(c.rows[idx].max()) if len(idx) else 0 for c, idx in parts]  # tokens held, per part
    dst.mark_written(np.repeat(used, [len(idx) for _, idx in parts]))
    dtype = np.dtype(dst.layout.dtype)
    for layer, pair in enumerate(dst.values):
        for j, d in enumerate(pair):
            def fill(out, layer=layer, j=j):
                at = 0
                for (c, idx), n in zip(parts, used):
                    out[at:at + len(idx), :, :n] = c.values[layer][j].numpy()[idx, :, :n]
                    at += len(idx)
            write(d, dtype, fill)


def merge(engine, a, a_mask: np.ndarray, b, b_mask: np.ndarray) -> tuple:
    """Rows of ``b`` under those of ``a`` in new buffers of the larger capacity; ``(cache, mask)``."""
    width = max(a.length, b.length)
    mask = np.zeros((a.batch + b.batch, width), np.int64)
    mask[:a.batch, width - a.length:] = a_mask
    mask[a.batch:, width - b.length:] = b_mask
    out = engine.new_cache(a.batch + b.batch, capacity=max(a.capacity, b.capacity))
    _copy_rows(engine, out, [(a, np.arange(a.batch)), (b, np.arange(b.batch))])
    out.rows = np.concatenate([a.rows, b.rows])
    out.length = width
    return out, mask


def take(engine, cache, mask: np.ndarray, keep: list) -> tuple:
    """Rows ``keep`` (in that order) in new buffers; mask columns that are padding in all of
    them cut off. Returns ``(cache, mask)``."""
    sub = mask[keep]
    live = np.flatnonzero(sub.any(axis=0))
    start = int(live[0]) if live.size else sub.shape[1]
    idx = np.asarray(keep, np.int64)
    out = engine.new_cache(len(keep), capacity=cache.capacity)
    _copy_rows(engine, out, [(cache, idx)])
    out.rows = cache.rows[idx].copy()
    out.length = cache.length - start
    return out, np.ascontiguousarray(sub[:, start:])


def prompt_kv(engine, cache, prompts: list, rows: list) -> list:
    """Per row i in ``rows`` (holding ``prompts[i]`` from token 0): [(k, v)] host arrays
    ``[1, kv_heads, len(prompts[i]), head_dim]`` per layer. Off the CPU only those rows' prompt
    tokens leave the device."""
    mover = engine.row_mover()
    if mover is not None:
        keep = max(len(prompts[i]) for i in rows)
        fetched = [tuple(mover.fetch(x, rows, keep) for x in pair) for pair in cache.values]
        return [[(k[j:j + 1, :, :len(prompts[i])], v[j:j + 1, :, :len(prompts[i])]) for k, v in fetched]
                for j, i in enumerate(rows)]
    arrays = [(k.numpy(), v.numpy()) for k, v in cache.values]  # the prefix cache copies what it keeps
    return [[(k[i:i + 1, :, :len(prompts[i])], v[i:i + 1, :, :len(prompts[i])]) for k, v in arrays] for i in rows]


def fill_prefix(cache, arrays: list, n: int):
    """``cache`` (batch 1, fresh) holding the ``n`` prefix tokens ``arrays`` [(k, v)] per layer."""
    dtype = np.dtype(cache.layout.dtype)
    for (dk, dv), (k, v) in zip(cache.values, arrays):
        for d, x in ((dk, k), (dv, v)):
            write(d, dtype, lambda out, x=x: out.__setitem__((slice(None), slice(None), slice(0, n)), x))
    cache.rows = np.array([n], np.int64)
    cache.length = n
    cache.mark_written(cache.rows)
    return cache

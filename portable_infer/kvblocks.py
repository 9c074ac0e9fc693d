"""KV memory for continuous batching: block accounting, and rows joining or leaving the cache.

Accounting is in blocks of ``block_size`` tokens: a request reserves the blocks for its prompt
plus ``max_new_tokens`` when it is admitted and gives them back when it ends, so the running
batch never holds more KV than the budget allows (a request that does not fit waits instead).

The cache itself is the graph's growing one (``growth: concat``, layout [batch, kv_heads, seq,
head_dim]). Sequences of different lengths share it right-aligned, padding on the left with
zero rows that the attention mask hides::

    batch (width 5)          newcomer (width 3)       merged (width 5)
    mask 0 1 1 1 1           mask 1 1 1          ->   mask 0 1 1 1 1
    mask 1 1 1 1 1                                    mask 1 1 1 1 1
                                                      mask 0 0 1 1 1   (KV rows zero-padded)

Positions come from ``cumsum(mask) - 1``, so padding changes nothing for the real tokens. When
rows leave, columns that are padding in every remaining row are cut off again.

Caches of ``growth: static`` graphs (fixed buffers, rows from index 0) have the same verbs in
:mod:`portable_infer.kvstatic`; ``merge``, ``take``, ``prompt_kv`` and ``from_prefix`` here
hand those over.
"""

from __future__ import annotations

import math

import numpy as np

from . import kvstatic
from .cache import KVCache
from .errors import InvalidArgumentError


class BlockPool:
    """Counts KV blocks of ``block_size`` tokens out of ``total`` (not thread-safe: lock outside)."""

    def __init__(self, total: int, block_size: int = 16):
        if not (isinstance(total, int) and total >= 1):
            raise InvalidArgumentError(f"the KV budget must hold at least one block, got {total!r} blocks; "
                                       f"raise kv_budget_tokens (or kv_budget_bytes)")
        if not (isinstance(block_size, int) and block_size >= 1):
            raise InvalidArgumentError(f"block_size must be an int >= 1, got {block_size!r}")
        self.total = total
        self.block_size = block_size
        self.used = 0

    @property
    def free(self) -> int:
        return self.total - self.used

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def try_reserve(self, blocks: int) -> bool:
        if blocks > self.free:
            return False
        self.used += blocks
        return True

    def release(self, blocks: int) -> None:
        if blocks > self.used:
            raise RuntimeError(f"releasing {blocks} KV blocks but only {self.used} are reserved")
        self.used -= blocks


def bytes_per_token(cache_layout) -> int:
    """KV bytes one token takes over all layers (keys and values)."""
    per = cache_layout.num_kv_heads * cache_layout.head_dim * np.dtype(cache_layout.dtype).itemsize
    return 2 * len(cache_layout.past) * per


def _arrays(cache: KVCache) -> list:
    return [(k.numpy(), v.numpy()) for k, v in cache.values]


def _wrap(cache: KVCache, arrays: list, batch: int, length: int, ort) -> KVCache:
    values = [(ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v)) for k, v in arrays]
    return KVCache(cache.layout, batch, values, length)


def _static(cache) -> bool:
    return not isinstance(cache, KVCache)


def merge(a, a_mask: np.ndarray, b, b_mask: np.ndarray, engine) -> tuple:
    """Stack the rows of ``b`` under those of ``a``, left-padding the shorter one.

    Returns ``(cache, mask)``; the inputs are left unchanged.
    """
    if _static(a):
        return kvstatic.merge(engine, a, a_mask, b, b_mask)
    ort = engine.ort
    width = max(a.length, b.length)
    rows = a.batch + b.batch
    mask = np.zeros((rows, width), np.int64)
    mask[:a.batch, width - a.length:] = a_mask
    mask[a.batch:, width - b.length:] = b_mask
    out = []
    for (ak, av), (bk, bv) in zip(_arrays(a), _arrays(b)):
        pair = []
        for x, y in ((ak, bk), (av, bv)):
            z = np.zeros((rows, x.shape[1], width, x.shape[3]), x.dtype)
            z[:a.batch, :, width - a.length:] = x
            z[a.batch:, :, width - b.length:] = y
            pair.append(z)
        out.append(tuple(pair))
    return _wrap(a, out, rows, width, ort), mask


def take(cache, mask: np.ndarray, keep: list, engine) -> tuple:
    """Keep the rows ``keep`` (in that order) and cut the columns that are padding in all of them.

    Returns ``(cache, mask)``.
    """
    if _static(cache):
        return kvstatic.take(engine, cache, mask, keep)
    ort = engine.ort
    sub = mask[keep]
    live = np.flatnonzero(sub.any(axis=0))
    start = int(live[0]) if live.size else sub.shape[1]
    idx = np.asarray(keep, np.int64)
    arrays = [tuple(np.ascontiguousarray(x[idx, :, start:]) for x in pair) for pair in _arrays(cache)]
    return _wrap(cache, arrays, len(keep), cache.length - start, ort), np.ascontiguousarray(sub[:, start:])


def prompt_kv(cache, prompts: list, rows: list, engine) -> list:
    """Per row i in ``rows`` (row i of ``cache`` holds ``prompts[i]``, right-aligned): [(k, v)]
    host arrays ``[1, kv_heads, len(prompts[i]), head_dim]`` per layer (for the prefix cache)."""
    if _static(cache):
        return kvstatic.prompt_kv(engine, cache, prompts, rows)
    arrays = _arrays(cache)  # views on the CPU; the prefix cache copies what it keeps
    start = [cache.length - len(prompts[i]) for i in rows]
    return [[(k[i:i + 1, :, s:], v[i:i + 1, :, s:]) for k, v in arrays] for i, s in zip(rows, start)]


def from_prefix(engine, arrays: list, n: int, capacity: int):
    """A batch-1 cache holding ``n`` prefix tokens (``arrays`` [(k, v)] per layer, host), with
    room for ``capacity`` tokens where the cache is fixed-size."""
    cache = engine.new_cache(1, capacity=capacity)
    if _static(cache):
        return kvstatic.fill_prefix(cache, arrays, n)
    return _wrap(cache, arrays, 1, n, engine.ort)

"""The KV of ``growth: paged`` graphs: one pool of blocks per engine, a block table per row.

Each layer's keys and values live in one pool ``[blocks, block_size, kv_heads, head_dim]`` on the
provider's device, bound as both past and present (the graph writes in place). A row owns the
blocks its table lists, in token order: token p of a row lives in ``table[p // block_size]`` at
row ``p % block_size``. So rows of different lengths take only the blocks they fill, and the row
operations continuous batching needs move no KV at all::

    pool      [ 0 ][ 1 ][ 2 ][ 3 ][ 4 ][ 5 ][ 6 ][ 7 ]
    row a     table [5, 2]      (20 tokens, block_size 16)
    row b     table [0]         ( 9 tokens)
    merge / take: new tables listing the same blocks (counted references); a block whose last
    reference goes back to the free list

A cache's references go when the cache is dropped (``weakref.finalize``), so the callers drop
caches as they drop the others. A block two caches hold is never written: only a row's last,
partly filled block takes new tokens, and a forward into a shared one is refused (merge and take
hand the rows to a new cache and the old one is dropped before the next forward).

Prompt prefixes are shared the same way (:class:`PrefixBlocks`, as vLLM's automatic prefix
caching): a prompt's whole blocks, once computed, are indexed by their tokens; a later row whose
prompt starts with the same tokens takes those blocks (a reference each) and computes only the
rest. Only whole blocks are shared, so the shared ones are never written.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from portable_infer.engine import padding
from portable_infer.engine.memory import bytes_per_token
from portable_infer.errors import CapacityError, InvalidArgumentError, PortableInferError
from portable_infer.package.manifest import KVLayout


class BlockPool:
    """The device pools of every layer and who holds each block (loop thread only).

    Args:
        layout: the graph's KV layout (``blocks``).
        ort: onnxruntime; ``device``: where the pools live ("cpu", "cuda").
        blocks, block_size: the pool's size.
        spare: one block more that no row ever holds (index ``blocks``: what padding rows of a
            decode graph write into, :mod:`~portable_infer.engine.paged_graphs`); such a pool
            does not grow.
        make: ``(shape, dtype) -> OrtValue``, the device pools' maker (the engine's
            ``kv_buffer``, engine.kv_alloc); default ONNX Runtime's Python-side allocator.
    """

    def __init__(self, layout: KVLayout, ort, device: str, blocks: int, block_size: int, spare: bool = False,
                 make=None):
        if blocks < 1 or block_size < 1:
            raise InvalidArgumentError(f"a KV pool needs blocks >= 1 and block_size >= 1, got {blocks} x {block_size}")
        self.layout, self.ort, self.device = layout, ort, device
        self.make = make or (lambda shape, dtype: ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0))
        self.blocks, self.block_size = blocks, block_size
        self.spare = blocks if spare else None
        self.values = self._make(None)  # [(key, value)] per layer
        self.refs = np.zeros(blocks, np.int64)
        self._free = list(range(blocks - 1, -1, -1))  # a stack: the lowest block first
        self.prefixes = PrefixBlocks(self)

    def _make(self, old: list | None) -> list:
        """Every layer's pools at the current size (``old``'s host copies [(key, value)] in their first blocks)."""
        dtype, ort = np.dtype(self.layout.dtype), self.ort
        if old is None and self.device != "cpu":
            return [tuple(self.make(self._shape, dtype) for _ in pair) for pair in self.layout.past]

        def pool(was):  # zeros on the CPU: a reference graph reads whole blocks (masked)
            a = np.zeros(self._shape, dtype)
            if was is not None:
                a[:len(was)] = was
            if self.device == "cpu":
                return ort.OrtValue.ortvalue_from_numpy(a, "cpu", 0)
            value = self.make(self._shape, dtype)  # a grown device pool: where the engine's buffers are made
            value.update_inplace(a)
            return value

        return [tuple(pool(w) for w in was) for was in (old or [(None, None)] * len(self.layout.past))]

    def grow(self, blocks: int) -> None:
        """``blocks`` blocks, the held ones kept (through the host: for pools a first cache sized)."""
        if self.spare is not None:
            raise PortableInferError("a KV pool with a spare block does not grow")
        old = [tuple(v.numpy() for v in pair) for pair in self.values]
        self.values = None
        added = range(self.blocks, blocks)
        self.blocks = blocks
        self.values = self._make(old)
        self.refs = np.concatenate([self.refs, np.zeros(len(added), np.int64)])
        self._free[:0] = list(reversed(added))  # after the old free blocks

    @property
    def _shape(self) -> tuple:
        return self.blocks + (self.spare is not None), self.block_size, self.layout.num_kv_heads, self.layout.head_dim

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def block_bytes(self) -> int:
        return self.block_size * bytes_per_token(self.layout)

    def extend(self, table: list, tokens: int) -> None:
        """``table`` grows to hold ``tokens`` tokens (its new blocks referenced once), or CapacityError."""
        more = -(-tokens // self.block_size) - len(table)
        if more <= 0:
            return
        if more > len(self._free):
            self.prefixes.evict(more - len(self._free))  # prefixes no row holds make room
        if more > len(self._free):
            raise CapacityError(f"the KV pool has {len(self._free)} free blocks of {self.block_size} tokens and a row "
                                f"needs {more} more; raise the KV budget (kv_budget_tokens) or lower max_batch")
        new = [self._free.pop() for _ in range(more)]
        self.refs[new] += 1
        table.extend(new)

    def hold(self, tables: list) -> None:
        for t in tables:
            self.refs[t] += 1

    def release(self, tables: list) -> None:
        """One reference less to each block of ``tables``; blocks left with none are free again."""
        for t in tables:
            self.refs[t] -= 1
            self._free.extend(b for b in reversed(t) if self.refs[b] == 0)

    def give_back(self, blocks) -> None:
        """Blocks whose last reference went (from the index): free again."""
        self._free.extend(b for b in blocks if self.refs[b] == 0)


class PrefixBlocks:
    """A pool's index of prompts' whole blocks, found again by their tokens (loop thread only).

    A block is keyed by the block before it in its prompt (-1 for the first) and its own tokens,
    so a match is exact, block by block from the first: no hash stands for the tokens. An indexed
    block holds a reference of its own; when the pool runs short, blocks no row holds are given
    back, least recently used first, each with the blocks indexed after it (their keys name it).
    """

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.index: dict = {}  # (block before, tokens) -> block
        self.keys: OrderedDict = OrderedDict()  # block -> its key, least recently used first
        self.after: dict = {}  # block -> the indexed blocks keyed by it
        self.hits = self.tokens_reused = 0

    def _runs(self, tokens, n: int):
        bs = self.pool.block_size
        return (tuple(int(t) for t in tokens[i * bs:(i + 1) * bs]) for i in range(n))

    def match(self, tokens, touch: bool = False) -> list:
        """The indexed blocks that hold ``tokens``' longest run of whole blocks, leaving at least
        one token to compute (its logits give the next token); ``touch``: a use (recency, counts)."""
        out, before = [], -1
        for run in self._runs(tokens, (len(tokens) - 1) // self.pool.block_size):
            b = self.index.get((before, run))
            if b is None:
                break
            out.append(b)
            before = b
        if touch and out:
            for b in out:
                self.keys.move_to_end(b)
            self.hits += 1
            self.tokens_reused += len(out) * self.pool.block_size
        return out

    def publish(self, tokens, table: list) -> None:
        """Index the whole blocks of ``tokens`` that ``table`` holds (a prompt just computed)."""
        before = -1
        for run, b in zip(self._runs(tokens, len(tokens) // self.pool.block_size), table):
            key = (before, run)
            have = self.index.get(key)
            if have is None:
                if b in self.keys:  # indexed under another key (cannot happen: one content a block)
                    return
                self.index[key], self.keys[b] = b, key
                self.after.setdefault(before, set()).add(b)
                self.pool.refs[b] += 1
                have = b
            self.keys.move_to_end(have)
            before = have

    def evict(self, need: int) -> None:
        """Give back at least ``need`` blocks no row holds (least recently used first), or all there are."""
        for b in list(self.keys):
            if need <= 0:
                return
            if b in self.keys and self.pool.refs[b] == 1:
                need -= self._drop(b)

    def _drop(self, b: int) -> int:
        """``b`` out of the index with every block indexed after it; returns the blocks freed."""
        freed = sum(self._drop(c) for c in list(self.after.pop(b, ())))
        key = self.keys.pop(b)
        del self.index[key]
        self.after.get(key[0], set()).discard(b)
        self.pool.refs[b] -= 1
        self.pool.give_back([b])
        return freed + int(self.pool.refs[b] == 0)

    @property
    def nbytes(self) -> int:
        return len(self.keys) * self.pool.block_bytes


def fill_tables(out: np.ndarray, tables: list, held: np.ndarray) -> None:
    """Write rows' block ``tables`` (``held`` [n] blocks each) into ``out`` [n, W] int32, row after
    row, -1 past each row's blocks: the ``block_table`` input of a packed step."""
    out.fill(-1)
    out[np.arange(out.shape[1]) < held[:, None]] = np.fromiter((b for t in tables for b in t), np.int32,
                                                               int(held.sum()))


@dataclass
class PagedCache:
    """Block tables over an engine's :class:`BlockPool`; see :class:`~portable_infer.engine.protocols.KVCache`."""

    layout: KVLayout
    batch: int
    capacity: int
    pool: BlockPool
    tables: list  # [[block, ...]] per row (mutated in place: the finalizer holds this list)
    rows: np.ndarray  # tokens held per row
    length: int = 0  # columns of the caller's mask seen so far, padding included
    _done: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self._done = weakref.finalize(self, self.pool.release, self.tables)

    @classmethod
    def empty(cls, pool: BlockPool, layout: KVLayout, batch: int, capacity: int) -> "PagedCache":
        return cls(layout, batch, capacity, pool, [[] for _ in range(batch)], np.zeros(batch, np.int64))

    def _with(self, tables: list, rows: np.ndarray, length: int, capacity: int) -> "PagedCache":
        self.pool.hold(tables)
        return PagedCache(self.layout, len(tables), capacity, self.pool, tables, rows, length)

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.layout)

    def nbytes(self) -> int:
        return sum(len(t) for t in self.tables) * self.pool.block_bytes

    def share(self, row: int, blocks: list) -> None:
        """Row ``row`` (empty) starts with ``blocks`` (a prefix's whole blocks: one reference more each)."""
        if self.tables[row]:
            raise InvalidArgumentError("a row takes shared prefix blocks only while it is empty")
        self.pool.hold([blocks])
        self.tables[row].extend(blocks)
        self.rows[row] = len(blocks) * self.pool.block_size

    def merge(self, mask: np.ndarray, other: "PagedCache", other_mask: np.ndarray) -> tuple:
        tables = [list(t) for t in self.tables] + [list(t) for t in other.tables]
        merged = self._with(tables, np.concatenate([self.rows, other.rows]), max(self.length, other.length),
                            max(self.capacity, other.capacity))
        return merged, padding.stack(mask, self.length, other_mask, other.length)

    def take(self, mask: np.ndarray, keep: list) -> tuple:
        sub, start = padding.keep_rows(mask, keep)
        tables = [list(self.tables[i]) for i in keep]
        return self._with(tables, self.rows[np.asarray(keep, np.int64)].copy(), self.length - start, self.capacity), sub

    def prompt_kv(self, prompts: list, rows: list) -> list:
        """Refused: a paged pool shares prompt prefixes by block reference (:class:`PrefixBlocks`,
        the paged batch's prefix cache), not by host copies."""
        raise InvalidArgumentError("a paged cache shares prefixes by block reference (PrefixBlocks), not host copies")

    def fill_prefix(self, arrays: list, n: int) -> None:
        """Refused, as :meth:`prompt_kv`."""
        raise InvalidArgumentError("a paged cache shares prefixes by block reference (PrefixBlocks), not host copies")

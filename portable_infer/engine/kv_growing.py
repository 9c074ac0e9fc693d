"""The KV cache of ``growth: concat`` graphs: the graph appends, the cache keeps the presents.

The graph itself appends the new rows and returns ``present`` tensors of ``past + seq`` tokens;
the cache keeps those ONNX Runtime values (OrtValues, on the provider's device) and feeds them back
as the next ``past`` without copying them through numpy. Memory therefore grows with the tokens
actually used, never sized to the full context.

Rows of different lengths share the cache right-aligned behind the caller's left padding
(layout ``[batch, kv_heads, length, head_dim]``), with zero KV where the mask is 0::

    batch (length 5)         newcomer (length 3)      merged (length 5)
    row 0: . t t t t         row: t t t          ->   row 0: . t t t t
    row 1: t t t t t                                  row 1: t t t t t
                                                      row 2: . . t t t   (KV zero-padded)

When rows leave, columns that are padding in every remaining row are cut off
(:mod:`~portable_infer.engine.padding`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from portable_infer.package.manifest import KVLayout
from portable_infer.engine import padding
from portable_infer.engine.memory import bytes_per_token


@dataclass
class GrowingCache:
    """Per-layer (key, value) OrtValues of ``length`` columns; see :class:`~portable_infer.engine.protocols.KVCache`."""

    layout: KVLayout
    batch: int
    capacity: int
    values: list  # [(key OrtValue, value OrtValue)] per layer, [B, KVH, length, D]
    rows: np.ndarray  # tokens held per row (padding not counted)
    length: int = 0  # columns held (the caller's mask width), padding included
    ort: object = field(default=None, repr=False, compare=False)  # onnxruntime: wraps host arrays

    @classmethod
    def empty(cls, layout: KVLayout, batch: int, capacity: int, ort) -> "GrowingCache":
        zero = np.zeros((batch, layout.num_kv_heads, 0, layout.head_dim), dtype=np.dtype(layout.dtype))
        v = ort.OrtValue.ortvalue_from_numpy(zero)  # one empty value serves every layer: ORT never writes a past
        return cls(layout, batch, capacity, [(v, v) for _ in layout.past], np.zeros(batch, np.int64), 0, ort)

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.layout)

    def update(self, presents: list, new_tokens: int) -> None:
        """Take the graph's present values as the next past (``new_tokens`` columns more)."""
        self.values = presents
        self.length += new_tokens

    def nbytes(self) -> int:
        return self.batch * self.length * self.bytes_per_token

    # --- rows joining and leaving ----------------------------------------------------------------
    def arrays(self) -> list:
        """[(k, v)] per layer as host arrays (views on the CPU)."""
        return [(k.numpy(), v.numpy()) for k, v in self.values]

    def _with(self, arrays: list, rows: np.ndarray, length: int, capacity: int) -> "GrowingCache":
        wrap = self.ort.OrtValue.ortvalue_from_numpy
        values = [(wrap(k), wrap(v)) for k, v in arrays]
        return GrowingCache(self.layout, len(rows), capacity, values, rows, length, self.ort)

    def merge(self, mask: np.ndarray, other: "GrowingCache", other_mask: np.ndarray) -> tuple:
        width = max(self.length, other.length)
        batch = self.batch + other.batch
        out = []
        for (ak, av), (bk, bv) in zip(self.arrays(), other.arrays()):
            pair = []
            for x, y in ((ak, bk), (av, bv)):
                z = np.zeros((batch, x.shape[1], width, x.shape[3]), x.dtype)
                z[:self.batch, :, width - self.length:] = x
                z[self.batch:, :, width - other.length:] = y
                pair.append(z)
            out.append(tuple(pair))
        merged = self._with(out, np.concatenate([self.rows, other.rows]), width, max(self.capacity, other.capacity))
        return merged, padding.stack(mask, self.length, other_mask, other.length)

    def take(self, mask: np.ndarray, keep: list) -> tuple:
        sub, start = padding.keep_rows(mask, keep)
        idx = np.asarray(keep, np.int64)
        arrays = [tuple(np.ascontiguousarray(x[idx, :, start:]) for x in pair) for pair in self.arrays()]
        return self._with(arrays, self.rows[idx].copy(), self.length - start, self.capacity), sub

    def prompt_kv(self, prompts: list, rows: list) -> list:
        arrays = self.arrays()  # views on the CPU; the prefix cache copies what it keeps
        start = [self.length - len(prompts[i]) for i in rows]
        return [[(k[i:i + 1, :, s:], v[i:i + 1, :, s:]) for k, v in arrays] for i, s in zip(rows, start)]

    def fill_prefix(self, arrays: list, n: int) -> None:
        wrap = self.ort.OrtValue.ortvalue_from_numpy
        self.values = [(wrap(k), wrap(v)) for k, v in arrays]
        self.rows = np.array([n], np.int64)
        self.length = n

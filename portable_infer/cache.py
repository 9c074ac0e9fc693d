"""The KV cache: one object, few verbs.

For graphs whose manifest says ``growth: concat`` the graph itself appends the new rows and
returns ``present`` tensors of ``past + seq`` rows; the cache keeps those ONNX Runtime values
(OrtValues, on the provider's device) and feeds them back as the next ``past`` without copying
them through numpy. Memory therefore grows with the tokens actually used, never sized to the
full context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .manifest import KVLayout


@dataclass
class KVCache:
    layout: KVLayout
    batch: int
    values: list = field(default_factory=list)  # [(key OrtValue, value OrtValue)] per layer
    length: int = 0  # rows per sequence held (past length), padding included

    @classmethod
    def empty(cls, layout: KVLayout, batch: int, ort) -> "KVCache":
        shape = (batch, layout.num_kv_heads, 0, layout.head_dim)
        zero = np.zeros(shape, dtype=np.dtype(layout.dtype))
        # One empty value serves every layer: ORT never writes into a past input.
        v = ort.OrtValue.ortvalue_from_numpy(zero)
        return cls(layout, batch, [(v, v) for _ in layout.past], 0)

    @property
    def offset(self) -> int:
        return self.length

    def update(self, presents: list, new_tokens: int) -> None:
        """Take the graph's present values as the next past."""
        self.values = presents
        self.length += new_tokens

    def reset(self, ort) -> None:
        fresh = KVCache.empty(self.layout, self.batch, ort)
        self.values, self.length = fresh.values, 0

    def nbytes(self) -> int:
        per = self.layout.num_kv_heads * self.layout.head_dim * np.dtype(self.layout.dtype).itemsize
        return 2 * len(self.layout.past) * self.batch * self.length * per

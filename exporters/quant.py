"""Block-quantized weights: GGUF blocks read as they are, and our own int4/int8 quantizer.

One representation covers every format, per block of ``block`` input elements::

    w = scale * (q - zero) + offset

    GGUF Q4_0   q in 0..15, zero = 8, offset = 0          (exact as signed int4: q - 8)
    GGUF Q4_1   q in 0..15, zero = 0, offset = m          (the offset needs a correction term)
    GGUF Q8_0   q in -128..127, zero = 0, offset = 0
    int4 (ours) q in 0..15, zero in 0..15 (asymmetric, uint8 zero points)
    int8 (ours) q in -127..127, zero = 0 (symmetric)

Arrays keep the Hugging Face Linear layout: rows are output features, blocks run along a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32


@dataclass
class Blocks:
    kind: str  # "q4_0" | "q4_1" | "q8_0" | "int4" | "int8"
    q: np.ndarray  # [out, in] uint8 (4-bit kinds, 0..15) or int8 (8-bit kinds)
    scale: np.ndarray  # [out, in // block] float32
    zero: np.ndarray | None = None  # [out, in // block] uint8, 4-bit asymmetric only
    offset: np.ndarray | None = None  # [out, in // block] float32, Q4_1 only
    block: int = BLOCK

    @property
    def bits(self) -> int:
        return 4 if self.kind in ("q4_0", "q4_1", "int4") else 8

    @property
    def shape(self) -> tuple:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        out, n = self.q.shape
        q = self.q.reshape(out, n // self.block, self.block).astype(np.float32)
        if self.zero is not None:
            q -= self.zero[..., None].astype(np.float32)
        w = q * self.scale[..., None]
        if self.offset is not None:
            w += self.offset[..., None]
        return w.reshape(out, n)

    def take_rows(self, index: np.ndarray) -> "Blocks":
        """Rows permuted or selected (exact: blocks run along rows)."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return Blocks(self.kind, self.q[index], self.scale[index], pick(self.zero),
                      pick(self.offset), self.block)

    @staticmethod
    def concat_rows(parts: list["Blocks"]) -> "Blocks | None":
        """Matrices stacked along rows (output features) when their block formats agree, else None."""
        first = parts[0]
        same = all(p.kind == first.kind and p.block == first.block and p.q.shape[1] == first.q.shape[1]
                   and (p.zero is None) == (first.zero is None) and (p.offset is None) == (first.offset is None)
                   for p in parts)
        if not same:
            return None
        cat = lambda a: None if getattr(first, a) is None else np.concatenate([getattr(p, a) for p in parts])  # noqa: E731
        return Blocks(first.kind, cat("q"), cat("scale"), cat("zero"), cat("offset"), first.block)

    def split_rows(self, sizes: list[int]) -> list["Blocks"]:
        bounds = np.cumsum([0] + list(sizes))
        return [self.take_rows(np.arange(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


# --- GGUF block decoding -------------------------------------------------------------------------
def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    # ggml packs element j in the low nibble and element j+16 in the high nibble of byte j.
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def from_gguf(kind: str, data: np.ndarray, rows: int, cols: int) -> Blocks:
    """Decode raw GGUF block bytes ([rows, bytes_per_row] uint8) into :class:`Blocks`."""
    nb = cols // BLOCK
    b = data.reshape(rows, nb, -1)
    if kind == "q8_0":
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, cols)
        return Blocks("q8_0", q, _f16(b[..., 0:2]))
    if kind == "q4_0":
        return Blocks("q4_0", _nibbles(b[..., 2:]).reshape(rows, cols), _f16(b[..., 0:2]),
                      zero=np.full((rows, nb), 8, np.uint8))
    if kind == "q4_1":
        return Blocks("q4_1", _nibbles(b[..., 4:]).reshape(rows, cols), _f16(b[..., 0:2]),
                      offset=_f16(b[..., 2:4]))
    raise ValueError(f"unsupported GGUF block type {kind}")


# --- our quantizer -------------------------------------------------------------------------------
def quantize(w: np.ndarray, bits: int, block: int = BLOCK) -> Blocks:
    """Round-to-nearest block quantization of a float [out, in] matrix.

    int4 is asymmetric (scale and uint8 zero point per block: the CPU MatMulNBits kernel is fast
    for uint8 zero points), int8 is symmetric.
    """
    out, n = w.shape
    if n % block:
        raise ValueError(f"input dimension {n} is not a multiple of the block size {block}")
    x = w.astype(np.float32).reshape(out, n // block, block)
    if bits == 8:
        scale = np.abs(x).max(-1) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
        return Blocks("int8", q.reshape(out, n), scale.astype(np.float32), block=block)
    if bits == 4:
        lo = np.minimum(x.min(-1), 0.0)
        hi = np.maximum(x.max(-1), 0.0)
        scale = (hi - lo) / 15.0
        scale[scale == 0] = 1.0
        zero = np.clip(np.rint(-lo / scale), 0, 15)
        q = np.clip(np.rint(x / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
        return Blocks("int4", q.reshape(out, n), scale.astype(np.float32), zero=zero.astype(np.uint8),
                      block=block)
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def pack_uint4(values: np.ndarray) -> np.ndarray:
    """Pack 0..15 values two per byte, element 2i in the low nibble (ONNX INT4/UINT4 order)."""
    flat = values.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] & 0x0F) | ((flat[1::2] & 0x0F) << 4)

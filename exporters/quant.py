"""Block-quantized weights: GGUF blocks read as they are, and our own int4/int8 quantizer.

One representation covers every format, per block of ``block`` input elements::

    w = scale * (q - zero) + offset

    q4_0   q in 0..15, zero per block (GGUF: 8)   GGUF Q4_0, Q3_K (block 16), TQ2_0 (block 256)
    q4_1   q in 0..15, offset per block           GGUF Q4_1, Q4_K, Q2_K (block 16)
    q8_0   q int8, zero = 0                       GGUF Q8_0, Q5_0, Q6_K (block 16), IQ4_NL, IQ4_XS
    q8_1   q uint8, offset per block              GGUF Q5_1, Q5_K
    int4   q in 0..15, zero in 0..15 (ours: asymmetric, uint8 zero points; symmetric: 8 throughout)
    int8   q in -127..127, zero = 0 (ours: symmetric)

(``exporters/gguf_blocks.py`` maps each ggml type onto these forms exactly.) An offset needs a
correction term in the graph (``weights.py``).

Arrays keep the Hugging Face Linear layout: rows are output features, blocks run along a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .parallel import for_each, row_chunks

BLOCK = 32


@dataclass
class Factored:
    """A per-block array kept as the source stores it: ``value = per_block * per_group`` (each
    group of ``group`` consecutive blocks sharing one ``per_group`` entry), both cast to float32.

    GGUF K-quants store a block's scale as a small integer times a super-block's fp16 scale, and
    the other types as an fp16: a few bits per block instead of a float32. Their fp32 product is
    exact, so a graph that multiplies the factors computes the very scale :class:`Blocks` holds.
    """

    per_block: np.ndarray  # [out, nb] uint8 | int8 | float16
    per_group: np.ndarray | None = None  # [out, nb // group] float32; None: value = per_block
    group: int = 1

    def value(self) -> np.ndarray:
        v = self.per_block.astype(np.float32)
        if self.per_group is None:
            return v
        out, nb = v.shape
        return (v.reshape(out, nb // self.group, self.group) * self.per_group[..., None]).reshape(out, nb)

    def take_rows(self, index: np.ndarray) -> "Factored":
        return Factored(self.per_block[index], None if self.per_group is None else self.per_group[index], self.group)

    @staticmethod
    def concat_rows(parts: list) -> "Factored | None":
        """Stacked rows, or None when a part is missing or the parts' layouts differ."""
        first = parts[0]
        if any(p is None or p.group != first.group or p.per_block.dtype != first.per_block.dtype
               or (p.per_group is None) != (first.per_group is None) for p in parts):
            return None
        group = None if first.per_group is None else np.concatenate([p.per_group for p in parts])
        return Factored(np.concatenate([p.per_block for p in parts]), group, first.group)


@dataclass
class Blocks:
    kind: str  # "q4_0" | "q4_1" | "q8_0" | "q8_1" | "int4" | "int8" (the module docstring)
    q: np.ndarray  # [out, in] uint8 (4-bit kinds, 0..15; q8_1) or int8 (q8_0, int8)
    scale: np.ndarray  # [out, in // block] float32
    zero: np.ndarray | None = None  # [out, in // block] uint8, 4-bit kinds only
    offset: np.ndarray | None = None  # [out, in // block] float32, q4_1 and q8_1 only
    block: int = BLOCK
    # the same scale / offset as the source stores them (GGUF), when it is more compact; an
    # emitter may write these instead (weights.py), and must get scale / offset back exactly
    scale_parts: Factored | None = None
    offset_parts: Factored | None = None

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
        part = lambda f: None if f is None else f.take_rows(index)  # noqa: E731
        return Blocks(self.kind, self.q[index], self.scale[index], pick(self.zero), pick(self.offset), self.block,
                      part(self.scale_parts), part(self.offset_parts))

    @staticmethod
    def concat_rows(parts: list["Blocks"]) -> "Blocks | None":
        """Matrices stacked along rows (output features) when their block formats agree, else None."""
        first = parts[0]
        same = all(p.kind == first.kind and p.block == first.block and p.q.shape[1] == first.q.shape[1]
                   and (p.zero is None) == (first.zero is None) and (p.offset is None) == (first.offset is None)
                   for p in parts)
        if not same:
            return None
        def cat(field: str, join=np.concatenate):
            return None if getattr(first, field) is None else join([getattr(p, field) for p in parts])

        return Blocks(first.kind, cat("q"), cat("scale"), cat("zero"), cat("offset"), first.block,
                      cat("scale_parts", Factored.concat_rows), cat("offset_parts", Factored.concat_rows))

    def split_rows(self, sizes: list[int]) -> list["Blocks"]:
        bounds = np.cumsum([0] + list(sizes))
        return [self.take_rows(np.arange(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


# --- our quantizer -------------------------------------------------------------------------------
def fitting_block(n: int, block: int) -> int:
    """``block``, or where it does not divide a row of ``n`` elements the largest halving down to
    BLOCK that does (SmolLM2's 576-wide rows at block 128 take 64); BLOCK itself is never halved."""
    while block > BLOCK and n % block:
        block //= 2
    return block


def quantize(w: np.ndarray, bits: int, block: int = BLOCK, symmetric: bool = False) -> Blocks:
    """Round-to-nearest block quantization of a float [out, in] matrix.

    int4 is asymmetric by default (scale and uint8 zero point per block: on SmolLM2's float
    stand-in 431/636 against 396/636 for symmetric blocks; MatMulNBits runs it as fast on AVX-512,
    while on AVX2 the zero-point input costs 11-15 % of a decode step, docs/benchmarks.md "Session
    29"). ``symmetric`` int4 (export --symmetric; GenAI's builder's ``int4_is_symmetric``, llama.cpp's
    Q4_0): the block's largest-magnitude value x_m maps to code 0 with scale x_m / -8 (negative
    where x_m is positive) and every zero point is 8, which the graph then leaves out. int8 is
    always symmetric. Rows are quantized in chunks on a few threads
    (``exporters.parallel``): the same values as one pass over the matrix, without its temporaries.
    """
    out, n = w.shape
    if n % block:
        raise ValueError(f"input dimension {n} is not a multiple of the block size {block}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    nb = n // block
    q = np.empty((out, n), np.int8 if bits == 8 else np.uint8)
    scale = np.empty((out, nb), np.float32)
    zero = np.empty((out, nb), np.uint8) if bits == 4 else None

    def part(rows: slice) -> None:
        x = np.asarray(w[rows], dtype=np.float32).reshape(-1, nb, block)
        # per-block min / max along the rows of the transposed copy: elementwise, not a reduction
        # over each block's 32 values one at a time (numpy's slow case)
        xt = np.ascontiguousarray(x.reshape(-1, block).T)
        lo, hi = xt.min(0).reshape(-1, nb), xt.max(0).reshape(-1, nb)
        if bits == 8:
            s = np.maximum(hi, -lo) / 127.0  # the largest |x| of the block
            s[s == 0] = 1.0
            y = np.divide(x, s[..., None])
            np.clip(np.rint(y, out=y), -127, 127, out=y)
        elif symmetric:
            s = np.where(hi >= -lo, hi, lo) / -8.0  # the value of largest magnitude lands on code 0
            s[s == 0] = 1.0
            y = np.divide(x, s[..., None])
            np.rint(y, out=y)
            y += 8.0
            np.clip(y, 0, 15, out=y)
            zero[rows] = 8
        else:
            lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
            s = (hi - lo) / 15.0
            s[s == 0] = 1.0
            z = np.clip(np.rint(-lo / s), 0, 15)
            y = np.divide(x, s[..., None])
            np.rint(y, out=y)
            y += z[..., None]
            np.clip(y, 0, 15, out=y)
            zero[rows] = z
        q[rows] = y.reshape(-1, n)
        scale[rows] = s

    for_each(part, row_chunks(out, n * 4))
    if bits == 8:
        return Blocks("int8", q, scale, block=block)
    return Blocks("int4", q, scale, zero=zero, block=block)


def pack_uint4(values: np.ndarray) -> np.ndarray:
    """Pack 0..15 values two per byte, element 2i in the low nibble (ONNX INT4/UINT4 order)."""
    flat = np.asarray(values, dtype=np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    pairs = flat.reshape(-1, 2)
    out = np.left_shift(pairs[:, 1], 4)  # a uint8 shift drops the high nibble: (v & 15) << 4
    out |= pairs[:, 0] & 0x0F
    return out

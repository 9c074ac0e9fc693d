"""Blocks in MatMulNBits' integer form (4-bit; 8-bit for Q4_1), fitted to the source's own values.

ONNX Runtime's fastest CPU path for MatMulNBits (int8 activations, ``accuracy_level`` 4, block
32, uint8 zero points) computes ``w = s * (c - z)`` per block, with ``c`` and ``z`` in 0..15. The
``-q4`` variants store every linear layer in that form, chosen per block::

    GGUF Q4_0   d * (q - 8)          exact: c = q, z = 8, s = d (and q4_0-form blocks: any z)
    GGUF Q4_1   d * q + m            fitted: the values d*j + m (j = 0..15) weighted by how often
                                     the block uses code j; c is a table lookup of q, so the fit
                                     reads the source block itself, never a rounded copy of it
    float       w                    fitted to the block's 32 values

The fit searches scales around the block's range (``FIT_SCALES`` times (max - min) / 15, the range
holding 0; / 255 at 8 bits) and, per scale, the two zero points nearest the block's minimum; codes
are rounded, the scale is re-fitted by least squares, and the candidate with the smallest error
wins, unless round-to-nearest (``quant.quantize``) does better on the values themselves (checked
in float64: the search scores candidates in float32, where its sums cancel to ~1e-5 of the error).
At 8 bits a candidate competes only if it moves no value more than one rounding step: that form is
there to hold the source's values, and a least-squares scale had moved a rarely used extreme value
by 1.02 steps (0.085 d of a Q4_1 block, past tests/test_int4_form.py's d/12); a bar of half a step
cost SmolLM2's static-q4 6 of 636 positions, one step none. A candidate's error::

    error = sum(e²) + MEAN_WEIGHT * (sum(e))² / n        e = s*(c - z) - w over the block

All blocks of a matrix are searched at once, in chunks of ``_CHUNK`` blocks on a few threads
(``exporters.parallel``): one Python step per candidate, none per block.

The second term charges a shift of the whole block: it multiplies the block's activation sum,
which in a transformer's hidden state is far from zero. Keeping Q4_1's codes with the integer
zero point nearest ``-m/d`` (what rounding a dequantized copy gives) shifts every element of a
block by the same remainder, up to d/2: that is the error this fit avoids.

Q4_1 cannot be held at 4 bits in this form: unless m/d is an integer, every block moves by up to
half a step (a second rounding; SmolLM2 lost a quarter of its top-1 agreement). ``bits=8`` fits it
to MatMulNBits' 8-bit form instead (codes and zero points in 0..255: about d/32 from the source),
which is what the -q4 graphs use for Q4_1 layers (``weights.Q4_1_FIT_BITS``).
"""

from __future__ import annotations

import numpy as np

from .parallel import for_each, row_chunks
from .quant import BLOCK, Blocks
from .shared_weights import SharedWeights

# Scale candidates, as multiples of (max - min) / levels: below 1 clips a block's extremes (cheap
# when they are rare), above 1 slides the grid against the source's so the errors spread. Eight
# reach 0.895 of round-to-nearest's error on SmolLM2-shaped float weights; 22 reach 0.887 in twice
# the time.
FIT_SCALES = (0.94, 1.0, 1.02, 1.04, 1.07, 1.1, 1.13, 1.16)
MEAN_WEIGHT = 1.0  # see the module docstring; measured choice (docs/benchmarks.md, int4 forms)
_CHUNK = 1 << 12  # blocks per vectorised step (on exporters.parallel's threads): its arrays stay in cache


def fit_int4(w: Blocks | np.ndarray, block: int = BLOCK, mean_weight: float | None = None, bits: int = 4) -> Blocks:
    """The MatMulNBits int4 form (uint8 codes and zero points, float32 scales) of a source matrix.

    Args:
        w: GGUF Q4_0 / Q4_1 blocks, our int4 blocks (returned as they are), or a float [out, in]
            matrix (its input size a multiple of ``block``).
        block: elements per block for float sources (GGUF blocks keep their own).
        mean_weight: weight of the block-shift term of the error (0: plain squared error;
            None: ``MEAN_WEIGHT``).
        bits: 4, or 8 for MatMulNBits' 8-bit form (codes and zero points in 0..255, kind
            "uint8"), which holds a Q4_1 block to about d/32.

    Returns:
        ``Blocks("int4", ...)`` (``"uint8"`` at 8 bits) with ``zero`` set: ``w ≈ scale * (q - zero)``
        per block.

    Example:
        >>> b = fit_int4(np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32))
        >>> b.kind, b.q.shape, b.zero.shape
        ('int4', (4, 64), (4, 2))
    """
    mean_weight = MEAN_WEIGHT if mean_weight is None else mean_weight
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    levels = 2 ** bits - 1
    if isinstance(w, Blocks):
        if w.kind == "int4" and bits == 4:
            return w
        if w.kind == "q4_0" and bits == 4:  # d * (q - z): GGUF Q4_0's z is 8, Q3_K's and TQ2_0's vary
            zero = np.full(w.scale.shape, 8, np.uint8) if w.zero is None else w.zero.astype(np.uint8)
            return Blocks("int4", w.q.astype(np.uint8), w.scale.astype(np.float32), zero=zero, block=w.block)
        if w.kind == "q4_1":
            return _fit_q4_1(w, mean_weight, levels)
        if w.bits == 4:
            return _fit_values(w.dequantize(), w.block, mean_weight, levels)
        raise ValueError(f"fit_int4 takes 4-bit blocks or float matrices, got {w.kind} blocks")
    return _fit_values(np.asarray(w, dtype=np.float32), block, mean_weight, levels)


def _kind(levels: int) -> str:
    return "int4" if levels == 15 else "uint8"


def _fit_values(w: np.ndarray, block: int, mean_weight: float, levels: int) -> Blocks:
    out, n = w.shape
    if n % block:
        raise ValueError(f"input dimension {n} is not a multiple of the block size {block}")
    x = w.reshape(-1, block)
    scale, zero, codes = np.empty(len(x), np.float32), np.empty(len(x), np.uint8), np.empty(x.shape, np.uint8)

    def part(blocks: slice) -> None:  # a block per column: the sums over a block are sums of rows
        scale[blocks], zero[blocks], c = _search(np.ascontiguousarray(x[blocks].T), None, mean_weight, levels)
        codes[blocks] = c.T

    for_each(part, row_chunks(len(x), 1, _CHUNK))
    nb = n // block
    return Blocks(_kind(levels), codes.reshape(out, n), scale.reshape(out, nb), zero=zero.reshape(out, nb),
                  block=block)


def _fit_q4_1(w: Blocks, mean_weight: float, levels: int = 15) -> Blocks:
    """Q4_1 (d*q + m): fit each block's 16-value grid, weighted by code counts, then map codes."""
    out, n = w.q.shape
    nb = n // w.block
    q = w.q.reshape(-1, w.block)
    d, m = w.scale.reshape(1, -1).astype(np.float32), w.offset.reshape(1, -1).astype(np.float32)
    scale, zero, codes = np.empty(len(q), np.float32), np.empty(len(q), np.uint8), np.empty(q.shape, np.uint8)

    def part(blocks: slice) -> None:
        grid = np.arange(16, dtype=np.float32)[:, None] * d[:, blocks] + m[:, blocks]  # [16, k]: a block's values
        rows = np.arange(len(q[blocks]))[:, None] * 16
        counts = np.bincount((rows + q[blocks]).ravel(), minlength=16 * len(rows)).reshape(-1, 16).astype(np.float32)
        scale[blocks], zero[blocks], table = _search(grid, np.ascontiguousarray(counts.T), mean_weight, levels)
        codes[blocks] = np.take_along_axis(table.T, q[blocks].astype(np.intp), axis=1)

    for_each(part, row_chunks(len(q), 1, _CHUNK))
    return Blocks(_kind(levels), codes.reshape(out, n), scale.reshape(out, nb), zero=zero.reshape(out, nb),
                  block=w.block)


def _rowsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 of ``a`` [n, k] -> [1, k] (n <= 128), adding in the order numpy's pairwise
    summation adds a contiguous row of n (eight interleaved partial sums, then a tree, then the
    rest): the same sums to the bit as ``a.T.sum(1)``, at elementwise speed (numpy reduces a short
    contiguous axis an element at a time)."""
    n = len(a)
    if n < 8:
        return a.sum(0, keepdims=True)
    whole = n - n % 8
    r = a[0:8].copy()
    for i in range(8, whole, 8):
        r += a[i:i + 8]
    out = ((r[0:1] + r[1:2]) + (r[2:3] + r[3:4])) + ((r[4:5] + r[5:6]) + (r[6:7] + r[7:8]))
    for i in range(whole, n):
        out += a[i:i + 1]
    return out


def _search(x: np.ndarray, counts: np.ndarray | None, mean_weight: float, levels: int = 15) -> tuple:
    """Best (scale [k], zero [k], codes [n, k]) for k blocks of n values ``x`` [n, k] (a block per
    column: sums over a block are sums of rows), each value weighted by ``counts`` [n, k] (None: 1).
    See the module docstring for the error.

    The range always holds 0 (``s * (c - z)`` with z in 0..15 does), so a block far from zero gets
    a coarser step. With the codes u = c - z of a candidate fixed, its error for any scale s'
    follows from three sums::

        sum(e²) = s'² Suu - 2 s' Sux + Sxx        sum(e) = s' Su - Sx        (e = s' u - x)

    Every candidate is scored for all k blocks at once; per scale factor the rounded values
    r = rint(x / s) are shared by its zero points (u = clip(r, -z, levels - z)). The three-sum
    form cancels in float32 (to ~1e-5 of the error), so the winner is checked at the end against
    round-to-nearest (``quant.quantize``'s scale and zero point) on the error of the values
    themselves, in float64: no block ends worse than rounding would leave it.
    """
    wsum = _rowsum if counts is None else (lambda a: _rowsum(a * counts))
    # sums of whole numbers below 2**24 (codes times counts) are exact in any order: one matmul
    ones = np.ones((1, len(x)), np.float32)
    isum = (lambda a: ones @ a) if counts is None else (lambda a: ones @ (a * counts))
    used = None if counts is None else counts > 0
    total = np.full((1, x.shape[1]), np.float32(len(x))) if counts is None else _rowsum(counts)
    sx, sxx = wsum(x), wsum(x * x)
    lo = np.minimum((x if used is None else np.where(used, x, np.inf)).min(0, keepdims=True), 0)
    hi = np.maximum((x if used is None else np.where(used, x, -np.inf)).max(0, keepdims=True), 0)
    span = np.maximum(hi - lo, np.float32(1e-30))
    best = np.full((1, x.shape[1]), np.inf, np.float32)
    b_scale, b_step, b_zero = np.ones_like(best), np.ones_like(best), np.zeros_like(best)
    r, u = np.empty_like(x), np.empty_like(x)
    for f in FIT_SCALES:
        s = span * np.float32(f / levels)
        z0 = np.rint(-lo / s)
        np.rint(np.multiply(x, 1.0 / s, out=r), out=r)
        for dz in (0.0, -1.0) if f >= 1.0 else (0.0, -1.0, 1.0):
            z = np.clip(z0 + dz, 0, levels)
            np.minimum(np.maximum(r, -z, out=u), levels - z, out=u)  # = clip(r + z, 0, levels) - z
            suu, sux, su = isum(u * u), wsum(u * x), isum(u)
            s_ls = sux / np.maximum(suu, 1e-30)
            for sc in (s, np.where(s_ls > 0, s_ls, s)):
                err = sc * sc * suu - 2 * sc * sux + sxx + mean_weight * (sc * su - sx) ** 2 / total
                if levels == 255:  # the 8-bit form holds the source's values: none moved beyond a step
                    moved = np.abs(sc * u - x) if used is None else np.where(used, np.abs(sc * u - x), 0)
                    err = np.where(moved.max(0, keepdims=True) <= s * np.float32(1.0), err, np.inf)
                better = err < best
                best = np.where(better, err, best)
                b_scale, b_step = np.where(better, sc, b_scale), np.where(better, s, b_step)
                b_zero = np.where(better, z, b_zero)
    codes = np.clip(np.rint(x / b_step) + b_zero, 0, levels)  # the winning candidate's codes
    flat = (hi - lo) <= 1e-30  # all zero: any scale, code = zero point
    b_scale = np.where(flat, np.float32(1.0), b_scale)
    # round-to-nearest as quant.quantize computes it
    step = (hi - lo) / np.float32(levels)
    step[step == 0] = 1.0
    z_rtn = np.clip(np.rint(-lo / step), 0, levels)
    rtn = np.clip(np.rint(x / step) + z_rtn, 0, levels)
    worse = _error64(codes, b_zero, b_scale, x, counts, mean_weight) > _error64(rtn, z_rtn, step, x, counts, mean_weight)
    if worse.any():
        codes = np.where(worse, rtn, codes)
        b_scale, b_zero = np.where(worse, step, b_scale), np.where(worse, z_rtn, b_zero)
    return b_scale[0].astype(np.float32), b_zero[0].astype(np.uint8), codes.astype(np.uint8)


def _error64(codes, zero, scale, x, counts, mean_weight: float) -> np.ndarray:
    """[1, k] sum(e²) + mean_weight * sum(e)² / n per block in float64, e = (codes - zero) * scale - x
    computed in float32 as ``Blocks.dequantize`` does (weighted by ``counts`` where given)."""
    e = ((codes - zero) * scale - x).astype(np.float64)
    if counts is None:
        return (e * e).sum(0, keepdims=True) + mean_weight * e.sum(0, keepdims=True) ** 2 / len(e)
    return (e * e * counts).sum(0, keepdims=True) + mean_weight * (e * counts).sum(0, keepdims=True) ** 2 / counts.sum(0, keepdims=True)


def fit_error(source: Blocks | np.ndarray, fitted: Blocks) -> dict:
    """How far the fitted blocks are from the source's exact values: max and mean |error|, the
    largest |mean error| of a block (its shift), each relative to the mean |value|."""
    exact = source.dequantize() if isinstance(source, Blocks) else np.asarray(source, np.float32)
    e = fitted.dequantize() - exact
    scale = float(np.abs(exact).mean()) or 1.0
    shift = np.abs(e.reshape(-1, fitted.block).mean(1))
    return {"max_abs": float(np.abs(e).max()), "mean_abs": float(np.abs(e).mean()),
            "max_block_shift": float(shift.max()), "mean_block_shift": float(shift.mean()),
            "mean_abs_rel": float(np.abs(e).mean()) / scale}


class FitCache(SharedWeights):
    """What the -q4 graphs of one export share: each weight fitted once (the second graph reuses
    the first one's initializers: ``SharedWeights``) and the fit's error over the whole model, for
    the manifest."""

    def __init__(self):
        super().__init__()
        self._n = 0
        self._abs = self._shift = self._value = 0.0
        self._max = self._max_rel = 0.0
        self._bits = {4: 0, 8: 0}  # weights fitted at each width

    def add(self, source: Blocks | np.ndarray, fitted: Blocks) -> None:
        """Count one fitted matrix: its error against the source's exact values (in row chunks on
        exporters.parallel's threads, summed in float64 in chunk order)."""
        parts = row_chunks(fitted.shape[0], fitted.shape[1] * 4)
        stats = [None] * len(parts)

        def part(i: int) -> None:
            rows = parts[i]
            src = source.take_rows(rows) if isinstance(source, Blocks) else source[rows]
            exact = src.dequantize() if isinstance(src, Blocks) else np.asarray(src, np.float32)
            e = fitted.take_rows(rows).dequantize() - exact
            shift = np.abs(e.reshape(-1, fitted.block).mean(1, dtype=np.float64))  # |mean error| of each block
            e = np.abs(e, out=e)
            step = (src.scale if isinstance(src, Blocks) else fitted.scale[rows])[..., None]
            ratio = e.reshape(*step.shape[:2], -1) / np.maximum(step, 1e-30)
            stats[i] = (e.size, e.sum(dtype=np.float64), shift.sum() * fitted.block,
                        np.abs(exact).sum(dtype=np.float64), float(e.max(initial=0.0)), float(ratio.max(initial=0.0)))

        for_each(part, list(range(len(parts))))
        for n, abs_e, shift, value, top, top_rel in stats:
            self._n += n
            self._bits[fitted.bits] += n
            self._abs += float(abs_e)
            self._shift += float(shift)
            self._value += float(value)
            self._max = max(self._max, top)
            self._max_rel = max(self._max_rel, top_rel)

    def summary(self) -> dict:
        """Mean |error| and mean |block shift| relative to the mean |weight|; the largest error,
        absolute and in steps of the source block (GGUF: its d; float: the fitted scale)."""
        n = max(self._n, 1)
        value = self._value / n or 1.0
        return {"weights": self._n, "weights_8bit": self._bits[8], "mean_abs_rel": self._abs / n / value,
                "mean_shift_rel": self._shift / n / value, "max_abs": self._max, "max_steps": self._max_rel}

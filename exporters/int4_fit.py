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
wins::

    error = sum(e²) + MEAN_WEIGHT * (sum(e))² / n        e = s*(c - z) - w over the block

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

from .quant import BLOCK, Blocks

# Scale candidates, as multiples of (max - min) / levels: below 1 clips a block's extremes (cheap
# when they are rare), above 1 slides the grid against the source's so the errors spread. Eight
# reach 0.895 of round-to-nearest's error on SmolLM2-shaped float weights; 22 reach 0.887 in twice
# the time.
FIT_SCALES = (0.94, 1.0, 1.02, 1.04, 1.07, 1.1, 1.13, 1.16)
MEAN_WEIGHT = 1.0  # see the module docstring; measured choice (docs/benchmarks.md, int4 forms)
_CHUNK = 1 << 12  # blocks per vectorised step: the temporary arrays stay in cache


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
    for a in range(0, len(x), _CHUNK):
        part = slice(a, a + _CHUNK)
        scale[part], zero[part], codes[part] = _search(x[part], None, mean_weight, levels)
    nb = n // block
    return Blocks(_kind(levels), codes.reshape(out, n), scale.reshape(out, nb), zero=zero.reshape(out, nb),
                  block=block)


def _fit_q4_1(w: Blocks, mean_weight: float, levels: int = 15) -> Blocks:
    """Q4_1 (d*q + m): fit each block's 16-value grid, weighted by code counts, then map codes."""
    out, n = w.q.shape
    nb = n // w.block
    q = w.q.reshape(-1, w.block)
    d, m = w.scale.reshape(-1, 1).astype(np.float32), w.offset.reshape(-1, 1).astype(np.float32)
    grid = d * np.arange(16, dtype=np.float32) + m  # the exact values the block can hold (fp32, as ggml)
    scale, zero, codes = np.empty(len(q), np.float32), np.empty(len(q), np.uint8), np.empty(q.shape, np.uint8)
    for a in range(0, len(q), _CHUNK):
        part = slice(a, a + _CHUNK)
        rows = np.arange(len(q[part]))[:, None] * 16
        counts = np.bincount((rows + q[part]).ravel(), minlength=16 * len(rows)).reshape(-1, 16).astype(np.float32)
        scale[part], zero[part], table = _search(grid[part], counts, mean_weight, levels)
        codes[part] = np.take_along_axis(table, q[part].astype(np.intp), axis=1)
    return Blocks(_kind(levels), codes.reshape(out, n), scale.reshape(out, nb), zero=zero.reshape(out, nb),
                  block=w.block)


def _search(x: np.ndarray, counts: np.ndarray | None, mean_weight: float, levels: int = 15) -> tuple:
    """Best (scale [k], zero [k], codes [k, n]) for k blocks of values ``x`` [k, n], each value
    weighted by ``counts`` (None: 1). See the module docstring for the error.

    The range always holds 0 (``s * (c - z)`` with z in 0..15 does), so a block far from zero gets
    a coarser step; round-to-nearest over that range (scale factor 1, the nearest zero point, no
    refit) is one of the candidates, so no block ends worse than rounding would leave it. With the
    codes u = c - z of a candidate fixed, its error for any scale s' follows from three sums::

        sum(e²) = s'² Suu - 2 s' Sux + Sxx        sum(e) = s' Su - Sx        (e = s' u - x)
    """
    wsum = (lambda a: a.sum(1, keepdims=True)) if counts is None else (lambda a: (a * counts).sum(1, keepdims=True))
    used = np.ones_like(x, dtype=bool) if counts is None else counts > 0
    total, sx, sxx = wsum(np.ones_like(x)), wsum(x), wsum(x * x)
    lo = np.minimum(np.where(used, x, np.inf).min(1, keepdims=True), 0)
    hi = np.maximum(np.where(used, x, -np.inf).max(1, keepdims=True), 0)
    span = np.maximum(hi - lo, np.float32(1e-30))
    best = np.full((len(x), 1), np.inf, np.float32)
    b_scale, b_step, b_zero = np.ones_like(best), np.ones_like(best), np.zeros_like(best)
    for f in FIT_SCALES:
        s = span * np.float32(f / levels)
        z0 = np.rint(-lo / s)
        inv = 1.0 / s
        for dz in (0.0, -1.0) if f >= 1.0 else (0.0, -1.0, 1.0):
            z = np.clip(z0 + dz, 0, levels)
            u = np.clip(np.rint(x * inv) + z, 0, levels) - z
            suu, sux, su = wsum(u * u), wsum(u * x), wsum(u)
            s_ls = sux / np.maximum(suu, 1e-30)
            for sc in (s, np.where(s_ls > 0, s_ls, s)):
                err = sc * sc * suu - 2 * sc * sux + sxx + mean_weight * (sc * su - sx) ** 2 / total
                better = err < best
                best = np.where(better, err, best)
                b_scale, b_step = np.where(better, sc, b_scale), np.where(better, s, b_step)
                b_zero = np.where(better, z, b_zero)
    codes = np.clip(np.rint(x / b_step) + b_zero, 0, levels)  # the winning candidate's codes
    b_scale, b_zero = b_scale[:, 0], b_zero[:, 0]
    flat = (hi - lo)[:, 0] <= 1e-30  # all zero: any scale, code = zero point
    b_scale[flat] = 1.0
    return b_scale.astype(np.float32), b_zero.astype(np.uint8), codes.astype(np.uint8)


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


class FitCache:
    """What the -q4 graphs of one export share: each weight fitted once (the second graph reuses
    the first one's initializers) and the fit's error over the whole model, for the manifest."""

    def __init__(self):
        self.emitted: dict = {}  # WeightStore key -> (emitted record, initializers)
        self._n = 0
        self._abs = self._shift = self._value = 0.0
        self._max = self._max_rel = 0.0
        self._bits = {4: 0, 8: 0}  # weights fitted at each width

    def emit(self, store, key: str, name: str, make) -> dict:
        """``store``'s MatMulNBits record of ``key``: made by ``make()`` the first time, else the
        first graph's initializers added to this graph (the shared data file holds them once)."""
        if key in self.emitted:
            store._stacked.pop(name, None)  # the stacked source matrix is not needed again
            record, protos = self.emitted[key]
            store.g.initializers.extend(protos)
            store._emitted[key] = record
            return record
        start = len(store.g.initializers)
        record = make()
        self.emitted[key] = (record, store.g.initializers[start:])
        return record

    def add(self, source: Blocks | np.ndarray, fitted: Blocks) -> None:
        """Count one fitted matrix: its error against the source's exact values."""
        exact = source.dequantize() if isinstance(source, Blocks) else np.asarray(source, np.float32)
        e = fitted.dequantize() - exact
        step = np.repeat(source.scale if isinstance(source, Blocks) else fitted.scale, fitted.block, axis=1)
        self._n += e.size
        self._bits[fitted.bits] += e.size
        self._abs += float(np.abs(e).sum())
        self._shift += float(np.abs(e.reshape(-1, fitted.block).mean(1)).sum()) * fitted.block
        self._value += float(np.abs(exact).sum())
        self._max = max(self._max, float(np.abs(e).max()))
        self._max_rel = max(self._max_rel, float((np.abs(e) / np.maximum(step, 1e-30)).max()))

    def summary(self) -> dict:
        """Mean |error| and mean |block shift| relative to the mean |weight|; the largest error,
        absolute and in steps of the source block (GGUF: its d; float: the fitted scale)."""
        n = max(self._n, 1)
        value = self._value / n or 1.0
        return {"weights": self._n, "weights_8bit": self._bits[8], "mean_abs_rel": self._abs / n / value,
                "mean_shift_rel": self._shift / n / value, "max_abs": self._max, "max_steps": self._max_rel}

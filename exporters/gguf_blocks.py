"""GGUF's quantized blocks as exact :class:`~exporters.quant.Blocks`: the ggml types whose integers
and scales map onto ONNX's block forms without a second rounding.

Every type below becomes one of four forms, per block of ``block`` input elements (``q`` the
stored integers, ``s`` the block's scale, ``m`` its offset)::

    ggml type  elements per scale   Blocks kind (bits)   stored q            w =
    Q4_0       32                   q4_0 (4)             q in 0..15          d * (q - 8)
    Q4_1       32                   q4_1 (4)             q in 0..15          d * q + m
    Q5_0       32                   q8_0 (8)             q - 16, int8        d * (q - 16)
    Q5_1       32                   q8_1 (8)             q in 0..31          d * q + m
    Q8_0       32                   q8_0 (8)             q, int8             d * q
    Q2_K       16 (of 256)          q4_1 (4)             q in 0..3           (d*sc) * q - (dmin*mn)
    Q3_K       16 (of 256)          q4_0 (4)             q + 8 in 4..11      (d*(sc-32)) * q
    Q4_K       32 (of 256)          q4_1 (4)             q in 0..15          (d*sc) * q - (dmin*mn)
    Q5_K       32 (of 256)          q8_1 (8)             q in 0..31          (d*sc) * q - (dmin*mn)
    Q6_K       16 (of 256)          q8_0 (8)             q - 32, int8        (d*sc) * (q - 32)
    IQ4_NL     32                   q8_0 (8)             kvalues[q], int8    d * kvalues[q]
    IQ4_XS     32 (of 256)          q8_0 (8)             kvalues[q], int8    (d*(ls-32)) * kvalues[q]
    TQ2_0      256                  q4_0 (4)             q + 7 in 7..9       d * (q - 1)

K-quants keep a super-block scale ``d`` (fp16) and small integer sub-block scales ``sc`` (and
mins ``mn``); the block scale ``d*sc`` is their fp32 product, computed as ``gguf.quants.dequantize``
computes it (an fp16 times an integer below 256: exact in fp32), so ``s * (q - zero) + m`` performs
the very fp32 operations ggml's reference does. The tests check equality bit for bit.

The other ggml types (IQ1_*, IQ2_*, IQ3_*, TQ1_0, MXFP4, NVFP4, ...) index codebooks of vectors
or use scales these forms cannot hold; the source dequantizes them (and says so).
"""

from __future__ import annotations

import numpy as np

from .quant import Blocks, Factored

QK_K = 256
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")  # read as float32 without loss
_IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def _f16(raw: np.ndarray) -> np.ndarray:
    """[n, 2] bytes -> [n, 1] float32 (the fp16 value, exactly)."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _split(blocks: np.ndarray, *sizes: int) -> list[np.ndarray]:
    return np.hsplit(blocks, np.cumsum(sizes).tolist())


def _low_high(qs: np.ndarray, width: int) -> np.ndarray:
    """Bytes in groups of ``width``: each group's low nibbles, then its high nibbles."""
    n = qs.shape[0]
    g = qs.reshape(n, -1, 1, width) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (g & 0x0F).reshape(n, -1)


def _bits(packed: np.ndarray, width: int, shifts: int) -> np.ndarray:
    """Groups of ``width`` bytes, each read ``shifts`` times: its bit fields of ``8 // shifts``
    bits, lowest first, each pass over the whole group."""
    n = packed.shape[0]
    step = 8 // shifts
    g = packed.reshape(n, -1, 1, width) >> np.arange(0, 8, step, dtype=np.uint8).reshape(1, 1, shifts, 1)
    return (g & ((1 << step) - 1)).reshape(n, -1)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins per super-block."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


# Each decoder takes [n, type_size] uint8 blocks and returns (kind, q [n, elements], scale,
# zero or None, offset or None, elements per scale); scale and offset as Factored [n, sub-blocks].
def _fp16(raw: np.ndarray) -> Factored:
    """One fp16 per block, as stored."""
    return Factored(np.ascontiguousarray(raw).view(np.float16))


def _times(small: np.ndarray, raw_d: np.ndarray, negate: bool = False) -> Factored:
    """Small integers per sub-block times the super-block's fp16 (negated for K-quant mins)."""
    d = _f16(raw_d)
    return Factored(np.ascontiguousarray(small), -d if negate else d, small.shape[1])


def _eights(n: int, per_row: int = 1) -> np.ndarray:
    return np.full((n, per_row), 8, np.uint8)


def _q4_0(b):
    d, qs = _split(b, 2)
    return "q4_0", _low_high(qs, 16), _fp16(d), _eights(len(b)), None, 32


def _q4_1(b):
    d, m, qs = _split(b, 2, 2)
    return "q4_1", _low_high(qs, 16), _fp16(d), None, _fp16(m), 32


def _five_bit(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: low nibbles as Q4_x, bit j of the little-endian uint32 ``qh`` on element j."""
    high = np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")
    return _low_high(qs, 16) | (high << 4)


def _q5_0(b):
    d, qh, qs = _split(b, 2, 4)
    return "q8_0", (_five_bit(qh, qs).astype(np.int8) - 16), _fp16(d), None, None, 32


def _q5_1(b):
    d, m, qh, qs = _split(b, 2, 2, 4)
    return "q8_1", _five_bit(qh, qs), _fp16(d), None, _fp16(m), 32


def _q8_0(b):
    d, qs = _split(b, 2)
    return "q8_0", np.ascontiguousarray(qs).view(np.int8), _fp16(d), None, None, 32


def _q2_k(b):
    scales, qs, d, dmin = _split(b, 16, 64, 2)
    q = _bits(qs, 32, 4)  # 2-bit fields: four passes over each 32 bytes
    return "q4_1", q, _times(scales & 0x0F, d), None, _times(scales >> 4, dmin, negate=True), 16


def _q3_k(b):
    hmask, qs, scales, d = _split(b, 32, 64, 12)
    low = _bits(qs, 32, 4)
    high = _bits(hmask, 32, 8) ^ 1  # a set bit means no -4
    sc_lo = _low_high(scales[:, :8], 8)  # 16 low nibbles
    sc_hi = _bits(scales[:, 8:], 4, 4)  # 16 two-bit fields
    sc = (sc_lo | (sc_hi << 4)).astype(np.int8) - 32
    q = low.astype(np.int8) - (high << 2).astype(np.int8)  # -4..3
    return "q4_0", (q + 8).astype(np.uint8), _times(sc, d), _eights(len(b), QK_K // 16), None, 16


def _q4_k(b):
    d, dmin, scales, qs = _split(b, 2, 2, 12)
    sc, mn = _k_scales(scales)
    return "q4_1", _low_high(qs, 32), _times(sc, d), None, _times(mn, dmin, negate=True), 32


def _q5_k(b):
    d, dmin, scales, qh, qs = _split(b, 2, 2, 12, 32)
    sc, mn = _k_scales(scales)
    q = _low_high(qs, 32) | (_bits(qh, 32, 8) << 4)
    return "q8_1", q, _times(sc, d), None, _times(mn, dmin, negate=True), 32


def _q6_k(b):
    ql, qh, scales, d = _split(b, 128, 64, 16)
    q = _low_high(ql, 64) | (_bits(qh, 32, 4) << 4)
    return "q8_0", q.astype(np.int8) - 32, _times(np.ascontiguousarray(scales).view(np.int8), d), None, None, 16


def _iq4_nl(b):
    d, qs = _split(b, 2)
    return "q8_0", _IQ4_VALUES[_low_high(qs, 16)], _fp16(d), None, None, 32


def _iq4_xs(b):
    d, sh, sl, qs = _split(b, 2, 2, 4)
    n = b.shape[0]
    high = np.ascontiguousarray(sh).view(np.uint16) >> np.arange(0, 16, 2, dtype=np.uint16)
    ls = _low_high(sl, 4).reshape(n, 2, 4).swapaxes(1, 2).reshape(n, 8)  # low nibble, high nibble per byte
    ls = (ls | ((high & 3).astype(np.uint8) << 4)).astype(np.int8) - 32
    return "q8_0", _IQ4_VALUES[_low_high(qs, 16)], _times(ls, d), None, None, 32


def _tq2_0(b):
    qs, d = _split(b, 64)
    q = _bits(qs, 32, 4)  # 0..2 for -1..1
    return "q4_0", (q + 7).astype(np.uint8), _fp16(d), _eights(len(b)), None, QK_K


def _constant_blocks(q: np.ndarray, scale: Factored, offset: Factored, block: int) -> tuple:
    """Sub-blocks with scale 0 hold their offset alone (``0 * q + m``): store them as codes 0 with
    a nonzero scale near |m| / 8 (the same values bit for bit), so no consumer divides by a zero
    scale (MatMulNBits' integer zero point of a q4_1 block is round(-m / s): 8 here)."""
    value = scale.value()
    flat = value == 0
    if not flat.any():
        return q, scale
    want = np.abs(offset.value()) / np.float32(8)
    want[want == 0] = 1.0
    if scale.per_group is None:  # fp16 scales
        sub = want.astype(np.float16)
        sub[sub == 0] = 1.0
        scale = Factored(np.where(flat, sub, scale.per_block), None, 1)
    else:  # small integers times the super-block scale: pick the integer nearest |m| / 8
        group = np.where(scale.per_group == 0, np.float32(1), scale.per_group)
        g = np.repeat(group, scale.group, axis=1)
        sub = np.clip(np.rint(want / np.abs(g)), 1, np.iinfo(scale.per_block.dtype).max)  # nonzero
        scale = Factored(np.where(flat, sub, scale.per_block).astype(scale.per_block.dtype), group, scale.group)
    q = np.where(np.repeat(flat, block, axis=1), 0, q).astype(q.dtype)
    return q, scale


DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
            "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
            "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs, "TQ2_0": _tq2_0}
EXACT_TYPES = tuple(DECODERS)


def decode(type_name: str, data: np.ndarray, rows: int, cols: int) -> Blocks:
    """Raw GGUF bytes of one [rows, cols] matrix of a type in :data:`EXACT_TYPES` -> Blocks.

    Args:
        type_name: the ggml type, e.g. ``"Q4_K"`` (any case: ``"q4_k"`` too).
        data: the tensor's bytes, ``[rows, bytes per row]`` (or flat) uint8, as gguf's reader
            gives them.
        rows, cols: the matrix in Hugging Face Linear layout (rows = output features; ggml's
            blocks run along a row).

    Returns:
        Blocks whose ``dequantize()`` equals ``gguf.quants.dequantize`` bit for bit.

    Example:
        >>> import gguf
        >>> raw = gguf.quants.quantize(np.ones((2, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
        >>> decode("Q8_0", raw, 2, 32).kind
        'q8_0'
    """
    type_name = type_name.upper()
    if type_name not in DECODERS:
        raise ValueError(f"ggml type {type_name} has no exact block form; exact: {', '.join(EXACT_TYPES)}")
    import gguf

    per_block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    if cols % per_block or data.size != rows * cols // per_block * size:
        raise ValueError(f"{type_name} data of {data.size} bytes does not hold a [{rows}, {cols}] matrix")
    kind, q, scale, zero, offset, block = DECODERS[type_name](np.asarray(data, np.uint8).reshape(-1, size))
    if offset is not None:
        q, scale = _constant_blocks(q, scale, offset, block)
    scale, offset = _per_row(scale, rows), _per_row(offset, rows)
    return Blocks(kind, q.reshape(rows, cols), scale.value(), zero=_rows(zero, rows),
                  offset=None if offset is None else offset.value(), block=block,
                  scale_parts=scale, offset_parts=offset)


def _rows(a: np.ndarray | None, rows: int) -> np.ndarray | None:
    """[blocks of the matrix, per block] -> [rows, per row] (blocks run along rows)."""
    return None if a is None else np.ascontiguousarray(a).reshape(rows, -1)


def _per_row(f: Factored | None, rows: int) -> Factored | None:
    return None if f is None else Factored(_rows(f.per_block, rows), _rows(f.per_group, rows), f.group)

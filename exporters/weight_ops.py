"""The ONNX side of a stored weight: its initializers and the ops that read them.

``weights.WeightStore`` decides which source tensor goes in at which precision and form (and
fits the -q4 graphs' layers); ``WeightOps`` writes a block-quantized matrix's initializers and
builds the graph ops over a stored record, in either form:

* portable: ``DequantizeLinear(q, scale, zero, axis=0, block_size)`` then a MatMul, and an
  offset term (GGUF Q4_1: ``w = d*q + m``) as ``blocksum(x) @ m``;
* fused: com.microsoft ``MatMulNBits`` over ``B [N, blocks, blob]``, Q4_1's offsets folded in as
  4-bit remainder rows that multiply the block sums (:meth:`WeightOps.augment`).

Each emitted weight is one typed record of its initializers' names: :class:`DenseWeight`,
:class:`BlockWeight` (DequantizeLinear form) or :class:`NBitsWeight` (MatMulNBits form).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from .block_scales import emit_transposed
from .graph import GraphBuilder
from .parallel import transposed
from .quant import Blocks, pack_uint4, quantize

AUGMENT_STAGES = 2  # 4-bit stages that carry a Q4_1 block's offset remainder (WeightOps.augment)
GGUF_UINT8_KINDS = ("q4_0", "q4_1", "q8_1")  # unsigned codes of exporters/gguf_blocks.py forms


@dataclass(frozen=True)
class DenseWeight:
    """A float matrix stored transposed, [in, out], for a plain MatMul."""

    w: str
    n_in: int


@dataclass(frozen=True)
class BlockWeight:
    """A block-quantized matrix for ``DequantizeLinear(q, scale, zero, axis=0, block_size)``, all
    transposed to [in, out]: ``w = scale * (q - zero) + offset`` per block of ``block`` inputs."""

    kind: str  # quant.Blocks kind (q4_0, q4_1, q8_0, q8_1, int4, int8, uint8)
    block: int
    q: str  # codes [in, out]: UINT4 packed two per byte, or bytes
    zero: str | None  # zero points [in / block, out], same type as q
    scale: str  # [in / block, out] (a graph value where the scales are stored factored)
    offset: str | None  # [in / block, out]: Q4_1-form offsets, multiplied by the block sums of x
    n_in: int


@dataclass(frozen=True)
class NBitsWeight:
    """A matrix in com.microsoft MatMulNBits layout: ``B [N, blocks, blob]`` uint8 codes with
    ``(q - zp) * scale`` per block; ``zp`` absent means MatMulNBits' implicit ``default_zp``."""

    n_in: int  # K
    n_out: int  # N
    block: int
    bits: int  # 4 or 8: the MatMulNBits ``bits`` attribute
    B: str  # codes (split: the high nibbles of 8-bit codes)
    scale: str  # [N, blocks (+ remainder rows)]
    zp: str | None  # explicit zero points (uint8, packed two per byte at 4 bits)
    default_zp: int  # the zero point the codes are centred on without ``zp`` (8 or 128)
    offset: str | None = None  # [blocks, N] per-block offsets: blocksum(x) @ offset is added
    offset_rows: str | None = None  # [N, blocks] the same, gathered by row (the embedding's table)
    B_lo: str | None = None  # an exact 8-bit matrix as two 4-bit halves: the low nibbles
    augment: int = 0  # Q4_1 offsets folded in: the padded width of one remainder stage, 0 without

    @property
    def split(self) -> bool:
        return self.B_lo is not None


class WeightOps:
    """Initializers of block-quantized weights and the ops over them, for one graph."""

    def __init__(self, g: GraphBuilder, dtype, onnx_dtype):
        self.g = g
        self.dtype = dtype  # activation dtype (np.float32 or np.float16)
        self.onnx_dtype = onnx_dtype
        self._block_sums: dict[str, str] = {}

    # --- portable form: DequantizeLinear + MatMul ----------------------------------------------
    def emit_blocks(self, base: str, b: Blocks, packed4: bool) -> BlockWeight:
        """Initializers of ``b`` transposed to [in, out]: 4-bit codes packed (``packed4``) or bytes."""
        g = self.g
        qT = transposed(b.q)  # contiguous [in, out], copied in cache-sized strips
        zT = None if b.zero is None else b.zero.T
        four = b.bits == 4 and packed4
        if four:
            q = g.packed_weight(base + "q4", pack_uint4(qT), qT.shape, TensorProto.UINT4)
            z = None if zT is None else g.packed_weight(base + "z4", pack_uint4(zT), zT.shape, TensorProto.UINT4)
        else:
            q = g.weight(base + "q8", np.ascontiguousarray(qT))
            z = None if zT is None else g.weight(base + "z8", np.ascontiguousarray(zT).astype(qT.dtype))
        return BlockWeight(
            kind=b.kind, block=b.block, q=q, zero=z, n_in=b.shape[1],
            # GGUF scales / offsets as stored (a byte or an fp16 per block), multiplied in the graph
            scale=emit_transposed(g, base + "scale", b.scale, b.scale_parts, self.dtype),
            offset=None if b.offset is None else emit_transposed(g, base + "offset", b.offset, b.offset_parts,
                                                                 self.dtype),
        )

    def dequant_matmul(self, x: str, t: DenseWeight | BlockWeight, offsets_in_weight: bool = False) -> str:
        """y = x @ W for a record of :meth:`emit_blocks` (or a dense one). Q4_1 offsets multiply the
        block sums of x, or with ``offsets_in_weight`` are added to W itself, every op over
        constants (``W = DequantizeLinear(...) + offsets repeated over each block``): a graph that
        ONNX Runtime folds into one fp32 MatMul at load (``static-dense``)."""
        if isinstance(t, DenseWeight):
            return self.g.matmul(x, t.w)
        g = self.g
        w = g.op("DequantizeLinear", [t.q, t.scale] + ([t.zero] if t.zero else []), axis=0, block_size=t.block)
        if t.offset and offsets_in_weight:  # offset [nb, N] -> [nb, 1, N] -> [nb, block, N] -> [K, N]
            nb = t.n_in // t.block
            rows = g.op("Expand", [g.unsqueeze(t.offset, [1]), g.const([nb, t.block, 1])])
            return g.matmul(x, g.add(w, g.reshape(rows, [t.n_in, -1])))
        y = g.matmul(x, w)
        if t.offset:
            y = g.add(y, g.matmul(self.block_sums(x, t.n_in, t.block), t.offset))
        return y

    def dequant_rows(self, ids: str, t: DenseWeight | BlockWeight) -> str:
        """Rows of a transposed [hidden, vocab] table record for ``ids`` [B, S] -> [B, S, hidden]:
        gathered along axis 1 and dequantized block-wise after the gather."""
        g = self.g
        if isinstance(t, DenseWeight):
            return g.transpose(g.gather(t.w, ids, axis=1), [1, 2, 0])
        #  q [in, vocab] --gather--> [in, B, S] -> [nb, block, B, S] ; scale [nb, vocab] -> [nb, 1, B, S]
        nb = t.n_in // t.block
        bs = g.shape(ids)
        q = g.reshape(g.cast(g.gather(t.q, ids, axis=1), self.onnx_dtype),
                      g.concat([g.const([nb, t.block]), bs], axis=0))
        if t.zero:
            z = g.cast(g.gather(t.zero, ids, axis=1), self.onnx_dtype)
            q = g.sub(q, g.unsqueeze(z, [1]))
        w = g.mul(q, g.unsqueeze(g.gather(t.scale, ids, axis=1), [1]))
        if t.offset:
            w = g.add(w, g.unsqueeze(g.gather(t.offset, ids, axis=1), [1]))
        return g.transpose(g.reshape(w, g.concat([g.const([t.n_in]), bs], axis=0)), [1, 2, 0])

    def block_sums(self, x: str, n_in: int, block: int) -> str:
        #  x [.., in] -> [.., in/block, block] -> ReduceSum(-1) -> [.., in/block]
        parts = self.g.reshape(x, [0, 0, n_in // block, block])
        return self.g.reduce_sum(parts, [-1], keepdims=0)

    # --- fused form: MatMulNBits ------------------------------------------------------------
    def emit_nbits(self, base: str, w: Blocks, bits: int, split8: bool, fold_offsets: bool) -> NBitsWeight:
        """Initializers of ``w`` in MatMulNBits layout at ``bits`` (8 also holds 4-bit blocks, values
        0..15 in bytes, so the tied embedding gathers rows from the lm_head's initializers).

        MatMulNBits is fastest without a zero-point input (implicit 8 for 4 bits, 128 for 8). Any
        other zero point z, and Q4_1's offset m, become one exact per-block offset::

            s*(q - z) + m  =  s*(q - default) + [m + s*(default - z)]

        except where an integer zero-point input is exact and as fast (:meth:`_zero_points`).
        ``split8``: an exact 8-bit matrix as two 4-bit halves; ``fold_offsets``: Q4_1 offsets as
        remainder rows (:meth:`augment`) instead of correction ops.
        """
        g = self.g
        n_out, n_in = w.shape
        nb = n_in // w.block
        bits_out = 4 if (bits == 4 and w.bits == 4) else 8
        default = 8 if bits_out == 4 else 128
        q = w.q.view(np.uint8) ^ np.uint8(0x80) if w.q.dtype == np.int8 else w.q  # signed int8 + 128, as uint8
        z = (w.zero.astype(np.float32) if w.zero is not None else 0.0) + (128 if w.q.dtype == np.int8 else 0)
        offset0 = (w.offset if w.offset is not None else 0.0) + w.scale * (default - z)
        q = q.astype(np.uint8, copy=False).reshape(n_out, nb, w.block)
        scale, augment = w.scale, 0
        zp, offset = self._zero_points(w, bits_out, default, split8, offset0)
        zp = None if zp is None else g.weight(base + ".zp", zp)
        if bits_out == 4 and w.offset is not None and fold_offsets:
            q, scale, offset, augment, zp = self.augment(w, q, base)
        scale = g.weight(base + ".scale", scale.astype(self.dtype))
        B_lo = None
        if bits_out == 4:
            B = g.weight(base + ".B", pack_uint4(q).reshape(n_out, q.shape[1], w.block // 2))
        elif split8:
            # ORT's 8-bit kernel at accuracy 1 is ~100x slower than its 4-bit one, so an exact
            # 8-bit matrix runs as two 4-bit halves:  u - 128 = 16(hi - 8) + (lo - 8) + 8
            hi, lo = q >> 4, q & 0x0F
            B = g.weight(base + ".Bhi", pack_uint4(hi).reshape(n_out, nb, w.block // 2))
            B_lo = g.weight(base + ".Blo", pack_uint4(lo).reshape(n_out, nb, w.block // 2))
            offset = offset0 + 8.0 * w.scale
        else:
            B = g.weight(base + ".B", q)
        offset_name = g.weight(base + ".offset", offset.T.astype(self.dtype)) if np.any(offset != 0) else None
        rows = None
        if bits_out == 8 and w.kind != "uint8" and np.any(offset0 != 0):  # the embedding gathers offsets by row
            rows = g.weight(base + ".offset_rows", np.asarray(offset0).astype(self.dtype))
        return NBitsWeight(n_in=n_in, n_out=n_out, block=w.block, bits=4 if bits_out == 4 or split8 else 8, B=B,
                           scale=scale, zp=zp, default_zp=default, offset=offset_name, offset_rows=rows,
                           B_lo=B_lo, augment=augment)

    def _zero_points(self, w: Blocks, bits_out: int, default: int, split8: bool, offset0: np.ndarray) -> tuple:
        """(MatMulNBits' uint8 zero-point input or None, the per-block offset left to add)."""
        nb = w.shape[1] // w.block
        if (bits_out == 4 and w.zero is not None and w.offset is None and w.q.dtype != np.int8
                and np.any(w.zero != default)):
            # Integer zero points (our asymmetric int4) go in as MatMulNBits' uint8 input: exact,
            # and no correction ops (which cost kernel launches on CUDA); as fast on AVX-512 CPUs,
            # 11-15 % of a step slower on AVX2 (docs/benchmarks.md "Session 29").
            zp = w.zero.astype(np.uint8)
            if nb % 2:
                zp = np.concatenate([zp, np.zeros((w.shape[0], 1), np.uint8)], axis=1)
            return pack_uint4(zp), np.zeros_like(offset0)
        if bits_out == 8 and w.kind == "uint8" and not split8:
            # fitted 8-bit codes with integer zero points (int4_fit, bits=8): MatMulNBits' own form
            return w.zero.astype(np.uint8), np.zeros_like(offset0)
        if (bits_out == 8 and w.q.dtype == np.uint8 and w.kind in GGUF_UINT8_KINDS and not split8
                and self.dtype == np.float32):  # CUDA (fp16) packages keep the form they had
            # unsigned GGUF codes at 8 bits (Q5_1, Q5_K; 4-bit blocks read as an 8-bit table):
            # their own zero points (0 without one) keep s*(q - z) exact and small, and the offset
            # term carries m alone (s*(q - 128) + [m + s*(128 - z)] cancels, and int8
            # activations' error would scale with q - 128)
            zero = w.zero if w.zero is not None else np.zeros(w.scale.shape, np.uint8)
            return np.ascontiguousarray(zero, np.uint8), (w.offset if w.offset is not None
                                                          else np.zeros_like(offset0))
        return None, offset0

    def augment(self, w: Blocks, q: np.ndarray, base: str) -> tuple:
        """Q4_1 in one MatMulNBits: integer zero points, and the remainder of each block's offset as
        extra input rows that multiply the block sums (4-bit, in blocks of their own)::

            d*q + m = d*(q - z) + r,   z = round(-m/d) in 0..15,   |r| <= d/2 unless z clips
            r = r1 + r2 + e,           r1 = quant4(r), r2 = quant4(r - r1): |e| ~ range(r) / 900
            y = MatMulNBits([x, bs, bs], [[q], [r1], [r2]])     bs = blocksum(x), zero-padded

        No correction ops, and the remainders are read as 4-bit values, not as a float matrix.
        One 4-bit stage alone (range/30 off) flipped a greedy token whose margin was 0.13 on
        SmolLM2; two stages keep the remainder about as exact as the GGUF's fp16 offsets.
        Returns the codes, scales and (zero) offsets with the rows appended, the padded width of
        one stage and the zero points' initializer.
        """
        n_out, nb, block = q.shape
        z = np.clip(np.rint(-w.offset / w.scale), 0, 15)
        r = (w.offset + w.scale * z).astype(np.float32)
        width = nb + (-nb) % block  # whole blocks: some providers want K a multiple of the block
        rest = np.concatenate([r, np.zeros((n_out, width - nb), np.float32)], axis=1)
        qs, scales, zps = [q], [w.scale], [z.astype(np.uint8)]
        for _ in range(AUGMENT_STAGES):
            rq = quantize(rest, 4, block)
            qs.append(rq.q.reshape(n_out, -1, block))
            scales.append(rq.scale)
            zps.append(rq.zero)
            rest = rest - rq.dequantize()
        zp = np.concatenate(zps, axis=1)
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((n_out, 1), np.uint8)], axis=1)
        zp = self.g.weight(base + ".zp", pack_uint4(zp))
        return (np.concatenate(qs, axis=1), np.concatenate(scales, axis=1), np.zeros((n_out, nb), np.float32),
                width, zp)

    def nbits_matmul(self, x: str, t: NBitsWeight, accuracy: int) -> str:
        """y = MatMulNBits(x, B) (+ blocksum(x) @ offset) for a MatMulNBits record; Q4_1 in the
        fused form: MatMulNBits([x, x @ S], B with the remainder rows) (see :meth:`augment`)."""
        g = self.g
        zp = [t.zp] if t.zp else []
        k = t.n_in
        if t.augment:
            sums = self._block_sum_matrix(t.n_in, t.block, t.augment, AUGMENT_STAGES)
            x = g.concat([x, g.matmul(x, sums)], axis=-1)
            k += t.augment * AUGMENT_STAGES
        mm = lambda b: g.op("MatMulNBits", [x, b, t.scale, *zp], domain="com.microsoft", K=k,  # noqa: E731
                            N=t.n_out, bits=t.bits, block_size=t.block, accuracy_level=accuracy)
        y = mm(t.B)
        if t.split:
            y = g.add(g.mul(y, g.const(16.0, self.dtype)), mm(t.B_lo))
        if t.offset:
            y = g.add(y, g.matmul(self.block_sums(x, t.n_in, t.block), t.offset))
        return y

    def nbits_rows(self, ids: str, t: NBitsWeight) -> str:
        """Rows of an 8-bit MatMulNBits table: (B[ids] - zp[ids]) * scale[ids] (+ offset[ids])."""
        g = self.g
        if t.split:  # u = 16 * hi + lo, each gathered as packed nibbles
            u = g.add(g.mul(self._unpack4(g.gather(t.B, ids), t), g.const(16, np.uint8)),
                      self._unpack4(g.gather(t.B_lo, ids), t))
        else:
            u = g.gather(t.B, ids)
        q = g.cast(u, self.onnx_dtype)  # [B, S, blocks, block]
        q = g.sub(q, g.const(t.default_zp, self.dtype))
        w = g.mul(q, g.unsqueeze(g.gather(t.scale, ids), [-1]))
        if t.offset_rows:
            w = g.add(w, g.unsqueeze(g.gather(t.offset_rows, ids), [-1]))
        return g.reshape(w, [0, 0, t.n_in])

    def _unpack4(self, packed: str, t: NBitsWeight) -> str:
        """[B, S, blocks, block/2] packed bytes -> [B, S, blocks, block] values (low nibble first)."""
        g = self.g
        lo = g.op("BitwiseAnd", [packed, g.const(0x0F, np.uint8)])
        hi = g.op("BitShift", [packed, g.const(4, np.uint8)], direction="RIGHT")
        pairs = g.concat([g.unsqueeze(lo, [-1]), g.unsqueeze(hi, [-1])], axis=-1)
        return g.reshape(pairs, [0, 0, t.n_in // t.block, t.block])

    def _block_sum_matrix(self, n_in: int, block: int, width: int, copies: int) -> str:
        """[n_in, copies * width] ones/zeros: x @ S = the block sums of x, zero-padded to ``width``,
        ``copies`` times."""
        name = f"blocksum.{n_in}x{width}x{copies}"
        if name not in self._block_sums:
            s = np.zeros((n_in, width), self.dtype)
            s[np.arange(n_in), np.arange(n_in) // block] = 1
            self._block_sums[name] = self.g.weight(name, np.tile(s, (1, copies)))
        return self._block_sums[name]

"""The ONNX side of a stored weight: its initializers and the ops that read them.

``weights.WeightStore`` decides which source tensor goes in at which precision and form (and
fits the -q4 graphs' layers); ``WeightOps`` writes a block-quantized matrix's initializers and
builds the graph ops over a stored record, in either form:

* portable: ``DequantizeLinear(q, scale, zero, axis=0, block_size)`` then a MatMul, and an
  offset term (GGUF Q4_1: ``w = d*q + m``) as ``blocksum(x) @ m``;
* fused: com.microsoft ``MatMulNBits`` over ``B [N, blocks, blob]``, Q4_1's offsets folded in as
  4-bit remainder rows that multiply the block sums (:meth:`WeightOps.augment`).

A record is the dict ``WeightStore`` keeps per emitted weight (keys as written below).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .block_scales import emit_transposed
from .graph import GraphBuilder
from .parallel import transposed
from .quant import Blocks, pack_uint4, quantize

AUGMENT_STAGES = 2  # 4-bit stages that carry a Q4_1 block's offset remainder (WeightOps.augment)


class WeightOps:
    """Initializers of block-quantized weights and the ops over them, for one graph."""

    def __init__(self, g: GraphBuilder, dtype, onnx_dtype):
        self.g = g
        self.dtype = dtype  # activation dtype (np.float32 or np.float16)
        self.onnx_dtype = onnx_dtype
        self._block_sums: dict[str, str] = {}

    # --- portable form: DequantizeLinear + MatMul ----------------------------------------------
    def emit_blocks(self, base: str, b: Blocks, packed4: bool) -> dict:
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
        return {
            "kind": b.kind, "block": b.block, "q": q, "zero": z,
            # GGUF scales / offsets as stored (a byte or an fp16 per block), multiplied in the graph
            "scale": emit_transposed(g, base + "scale", b.scale, b.scale_parts, self.dtype),
            "offset": None if b.offset is None else emit_transposed(g, base + "offset", b.offset, b.offset_parts,
                                                                    self.dtype),
        }

    def dequant_matmul(self, x: str, t: dict) -> str:
        """y = x @ W for a record of :meth:`emit_blocks` (or a dense one: ``{"kind": "dense", "w"}``)."""
        if t["kind"] == "dense":
            return self.g.matmul(x, t["w"])
        w = self.g.op("DequantizeLinear", [t["q"], t["scale"]] + ([t["zero"]] if t["zero"] else []),
                      axis=0, block_size=t["block"])
        y = self.g.matmul(x, w)
        if t["offset"]:
            y = self.g.add(y, self.g.matmul(self.block_sums(x, t["in"], t["block"]), t["offset"]))
        return y

    def dequant_rows(self, ids: str, t: dict) -> str:
        """Rows of a transposed [hidden, vocab] table record for ``ids`` [B, S] -> [B, S, hidden]:
        gathered along axis 1 and dequantized block-wise after the gather."""
        g = self.g
        if t["kind"] == "dense":
            return g.transpose(g.gather(t["w"], ids, axis=1), [1, 2, 0])
        #  q [in, vocab] --gather--> [in, B, S] -> [nb, block, B, S] ; scale [nb, vocab] -> [nb, 1, B, S]
        nb = t["in"] // t["block"]
        bs = g.shape(ids)
        q = g.reshape(g.cast(g.gather(t["q"], ids, axis=1), self.onnx_dtype),
                      g.concat([g.const([nb, t["block"]]), bs], axis=0))
        if t["zero"]:
            z = g.cast(g.gather(t["zero"], ids, axis=1), self.onnx_dtype)
            q = g.sub(q, g.unsqueeze(z, [1]))
        w = g.mul(q, g.unsqueeze(g.gather(t["scale"], ids, axis=1), [1]))
        if t["offset"]:
            w = g.add(w, g.unsqueeze(g.gather(t["offset"], ids, axis=1), [1]))
        return g.transpose(g.reshape(w, g.concat([g.const([t["in"]]), bs], axis=0)), [1, 2, 0])

    def block_sums(self, x: str, n_in: int, block: int) -> str:
        #  x [.., in] -> [.., in/block, block] -> ReduceSum(-1) -> [.., in/block]
        parts = self.g.reshape(x, [0, 0, n_in // block, block])
        return self.g.reduce_sum(parts, [-1], keepdims=0)

    # --- fused form: MatMulNBits ------------------------------------------------------------
    def augment(self, t: dict, w: Blocks, q: np.ndarray, base: str) -> tuple:
        """Q4_1 in one MatMulNBits: integer zero points, and the remainder of each block's offset as
        extra input rows that multiply the block sums (4-bit, in blocks of their own)::

            d*q + m = d*(q - z) + r,   z = round(-m/d) in 0..15,   |r| <= d/2 unless z clips
            r = r1 + r2 + e,           r1 = quant4(r), r2 = quant4(r - r1): |e| ~ range(r) / 900
            y = MatMulNBits([x, bs, bs], [[q], [r1], [r2]])     bs = blocksum(x), zero-padded

        No correction ops, and the remainders are read as 4-bit values, not as a float matrix.
        One 4-bit stage alone (range/30 off) flipped a greedy token whose margin was 0.13 on
        SmolLM2; two stages keep the remainder about as exact as the GGUF's fp16 offsets.
        Returns the codes, scales and (zero) offsets with the rows appended; sets ``t``'s
        ``augment`` (the padded width of one stage) and ``zp``.
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
        t.update(augment=width, zp=self.g.weight(base + ".zp", pack_uint4(zp)))
        return np.concatenate(qs, axis=1), np.concatenate(scales, axis=1), np.zeros((n_out, nb), np.float32)

    def nbits_matmul(self, x: str, t: dict, accuracy: int) -> str:
        """y = MatMulNBits(x, B) (+ blocksum(x) @ offset) for a MatMulNBits record; Q4_1 in the
        fused form: MatMulNBits([x, x @ S], B with the remainder rows) (see :meth:`augment`)."""
        g = self.g
        zp = [t["zp"]] if t["zp"] and not t["split"] else []
        k = t["n_in"]
        if t.get("augment"):
            sums = self._block_sum_matrix(t["n_in"], t["block"], t["augment"], AUGMENT_STAGES)
            x = g.concat([x, g.matmul(x, sums)], axis=-1)
            k += t["augment"] * AUGMENT_STAGES
        mm = lambda b: g.op("MatMulNBits", [x, b, t["scale"], *zp], domain="com.microsoft", K=k,  # noqa: E731
                            N=t["n_out"], bits=t["bits"], block_size=t["block"], accuracy_level=accuracy)
        y = mm(t["B"])
        if t["split"]:
            y = g.add(g.mul(y, g.const(16.0, self.dtype)), mm(t["B_lo"]))
        if t["offset"]:
            y = g.add(y, g.matmul(self.block_sums(x, t["n_in"], t["block"]), t["offset"]))
        return y

    def nbits_rows(self, ids: str, t: dict) -> str:
        """Rows of an 8-bit MatMulNBits table: (B[ids] - zp[ids]) * scale[ids] (+ offset[ids])."""
        g = self.g
        if t["split"]:  # u = 16 * hi + lo, each gathered as packed nibbles
            u = g.add(g.mul(self._unpack4(g.gather(t["B"], ids), t), g.const(16, np.uint8)),
                      self._unpack4(g.gather(t["B_lo"], ids), t))
        else:
            u = g.gather(t["B"], ids)
        q = g.cast(u, self.onnx_dtype)  # [B, S, blocks, block]
        q = g.sub(q, g.const(t["default_zp"], self.dtype))
        w = g.mul(q, g.unsqueeze(g.gather(t["scale"], ids), [-1]))
        if t["offset_rows"]:
            w = g.add(w, g.unsqueeze(g.gather(t["offset_rows"], ids), [-1]))
        return g.reshape(w, [0, 0, t["n_in"]])

    def _unpack4(self, packed: str, t: dict) -> str:
        """[B, S, blocks, block/2] packed bytes -> [B, S, blocks, block] values (low nibble first)."""
        g = self.g
        lo = g.op("BitwiseAnd", [packed, g.const(0x0F, np.uint8)])
        hi = g.op("BitShift", [packed, g.const(4, np.uint8)], direction="RIGHT")
        pairs = g.concat([g.unsqueeze(lo, [-1]), g.unsqueeze(hi, [-1])], axis=-1)
        return g.reshape(pairs, [0, 0, t["n_in"] // t["block"], t["block"]])

    def _block_sum_matrix(self, n_in: int, block: int, width: int, copies: int) -> str:
        """[n_in, copies * width] ones/zeros: x @ S = the block sums of x, zero-padded to ``width``,
        ``copies`` times."""
        name = f"blocksum.{n_in}x{width}x{copies}"
        if name not in self._block_sums:
            s = np.zeros((n_in, width), self.dtype)
            s[np.arange(n_in), np.arange(n_in) // block] = 1
            self._block_sums[name] = self.g.weight(name, np.tile(s, (1, copies)))
        return self._block_sums[name]

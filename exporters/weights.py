"""Weights into the graph at the requested precision: dense float, or block-quantized.

Linear weights are stored transposed, ``[in, out]``, so ``y = x @ W`` is a plain MatMul and the
block-quantized form is ``DequantizeLinear(q, scale, zero, axis=0, block_size=32)`` (which ONNX
Runtime's CPU provider may fuse into MatMulNBits). An offset term (GGUF Q4_1: ``w = d*q + m``)
becomes an exact correction in the portable graph::

    y = x @ DQ(q, d)  +  blocksum(x) @ m        blocksum(x)[.., b] = sum of x over block b

The fused graphs fold it into the MatMulNBits itself (integer zero points, and the remainder as
4-bit rows that multiply the block sums: see ``weight_ops.WeightOps.augment``), except with fp16
activations, which keep the correction ops. The initializers and the ops that read them, in either
form, are written by ``weight_ops.WeightOps``; this module picks the tensor, precision and form.

Each source tensor is written once: the tied embedding and lm_head share initializers.
"""

from __future__ import annotations

import logging

import numpy as np
from onnx import TensorProto

from .graph import GraphBuilder
from .int4_fit import fit_int4
from .quant import BLOCK, Blocks, pack_uint4, quantize
from .shared_weights import SharedWeights
from .weight_ops import WeightOps

logger = logging.getLogger(__name__)

PRECISION_BITS = {"fp32": None, "fp16": None, "int8": 8, "int4": 4}
# lm_head forms of the fused graphs (with int8-activation heads): 8-bit table with its top 16
# candidates recomputed in float, 8-bit alone, 4-bit (the table in the -q4 graphs' 4-bit form), or
# a float MatMul
HEAD_FORMS = ("int8-top16", "int8", "int4", "fp32")
# Width of the -q4 graphs' Q4_1 layers (d*q + m; Q4_K has the same form). At 4 bits the fit into
# integer zero points is a second rounding: SmolLM2 agreed with its reference on 74.4 % of 636
# positions (round-to-nearest of the dequantized copy: 70.4 %). MatMulNBits' 8-bit form holds each
# block to ~d/32 and agreed on 95.6 % (static-int8, exact weights: 96.2 %): docs/benchmarks.md.
Q4_1_FIT_BITS = 8
# Float weights in the -q4 graphs: round-to-nearest (quant.quantize, the -int8 twins' own form).
# int4_fit's search lowered SmolLM2-shaped float weights' error 10 % below it yet agreed less with
# the reference (66.2 % against 67.1 % of 636 positions, perplexity +41 % against +35 %).
FLOAT_FIT = False
GGUF_UINT8_KINDS = ("q4_0", "q4_1", "q8_1")  # unsigned codes of exporters/gguf_blocks.py forms


class WeightStore:
    """Fetches source tensors, converts them to the package precision and emits them."""

    def __init__(self, g: GraphBuilder, source, precision: str, transposed: bool = False,
                 nbits_accuracy: int | None = None, head_accuracy: int | None = None, activations: str = "fp32",
                 int4_fit: bool = False, head_form: str = "int8-top16", shared: SharedWeights | None = None):
        self.g = g
        self.source = source
        self.precision = precision
        half = precision == "fp16" or activations == "fp16"  # int4/int8 weights may run fp16 activations
        self.dtype = np.float16 if half else np.float32
        self.onnx_dtype = TensorProto.FLOAT16 if half else TensorProto.FLOAT
        self.ops = WeightOps(g, self.dtype, self.onnx_dtype)  # initializers and the ops over them
        self.transposed = transposed  # GPT-2 Conv1D: source stores [in, out]
        self._emitted: dict[str, dict] = {}
        # Fused variant: block weights go to com.microsoft MatMulNBits with this accuracy level
        # (None = portable DequantizeLinear + MatMul).
        self.nbits_accuracy = nbits_accuracy
        self.head_accuracy = head_accuracy or nbits_accuracy  # the lm_head (and tied table)
        self.split8 = self.head_accuracy == 1
        # Q4_1 offsets folded into MatMulNBits (extra rows) instead of float correction ops; fp16
        # activations (CUDA) keep the ops, whose launches CUDA graphs absorb
        self.augment_offsets = not half
        self._stacked: dict[str, object] = {}  # virtual tensors: row-stacked source matrices
        # The -q4 variants: 4-bit layers in MatMulNBits' integer form (uint8 zero points, no
        # correction rows), fitted to the source blocks (int4_fit.fit_int4)
        self.int4_fit = int4_fit
        # MatMulNBits weights emitted once for the graphs of one data file (shared_weights.py);
        # for the -q4 graphs an int4_fit.FitCache, which also counts the fit's error
        self.shared = shared
        self.fit_cache = shared if int4_fit else None
        if head_form not in HEAD_FORMS:
            raise ValueError(f"head_form must be one of {HEAD_FORMS}, got {head_form!r}")
        self.head_form = head_form  # the fused graphs' lm_head (FusedDecoderBuilder.lm_head)
        self.fit_8bit: set[str] = set()  # 8-bit tables fitted to 4 bits all the same (an int4 lm_head)

    def stack(self, names: list[str], key: str) -> str | None:
        """Register the row-wise stack of [out, in] weights (or of biases) under ``key``, so one
        matmul computes q/k/v or gate/up; None when their storage formats differ. Where an earlier
        graph of the shared data file decided it, the parts are read only if this graph needs them
        (it does not when that graph emitted the stack already)."""
        known = None if self.shared is None else self.shared.stacks.get(key)
        if known is None:
            w = self._concat(names)
            known = w is not None
            if self.shared is not None:
                self.shared.stacks[key] = known
            if known:
                self._stacked[key] = w
        elif known:
            self._stacked[key] = lambda: self._concat(names)
        return key if known else None

    def _concat(self, names: list[str]):
        parts = [self._matrix(n) for n in names]
        if all(isinstance(p, Blocks) for p in parts):
            return Blocks.concat_rows(parts)
        if not any(isinstance(p, Blocks) for p in parts):
            return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])
        return None

    # --- small float tensors (norms, biases) --------------------------------------------------
    def vector(self, name: str, dtype=None, add: float = 0.0) -> str:
        w = self._dense(self._matrix(name)) + np.float32(add)
        return self.g.weight(_init_name(name, "f" if add == 0 else "f1"), w.astype(dtype or self.dtype))

    # --- linear layers ------------------------------------------------------------------------
    def linear(self, x: str, name: str, bias: str | None = None, bits: int | None = -1,
               accuracy: int | None = None) -> str:
        """y = x @ W^T (+ b) for the HF weight ``name`` of shape [out, in]."""
        bits = PRECISION_BITS[self.precision] if bits == -1 else bits
        if self.nbits_accuracy is not None and bits is not None:
            y = self.ops.nbits_matmul(x, self._nbits(name, bits), accuracy or self.nbits_accuracy)
        else:
            y = self.ops.dequant_matmul(x, self._emit(name, bits))
        if bias is not None:
            y = self.g.add(y, self.vector(bias))
        return y

    def _nbits(self, name: str, bits: int) -> dict:
        """Emit (once) a weight in MatMulNBits layout: B [N, blocks, blob] uint8, scales, zero points.

        ``bits`` 8 also holds 4-bit blocks (values 0..15 in bytes), so the tied embedding can
        gather rows from the same initializers as the lm_head.
        """
        key = f"{name}#nbits{bits}"
        if key in self._emitted:
            return self._emitted[key]
        if self.shared is not None:  # converted (-q4: fitted) once per export
            return self.shared.emit(self, key, name, lambda: self._emit_nbits(name, bits, key))
        return self._emit_nbits(name, bits, key)

    def _emit_nbits(self, name: str, bits: int, key: str) -> dict:
        twin = f"{name}#nbits{12 - bits}" in self._emitted  # the tied table at the other width
        g, base = self.g, _init_name(name, f"nbits{bits}" if twin else "nbits")
        w = self._matrix(name)
        # every 4-bit linear of a -q4 graph; exact 8-bit GGUF blocks (Q5_x, Q6_K, Q8_0) stay 8-bit
        # layers there: fitting them to 4 bits would round them a second time (gguf_blocks.py)
        eight = isinstance(w, Blocks) and w.bits == 8
        if self.int4_fit and bits == 4 and (not eight or name in self.fit_8bit):
            source = w.dequantize() if eight else w
            if isinstance(source, Blocks) or FLOAT_FIT:
                w = fit_int4(source, bits=Q4_1_FIT_BITS if getattr(source, "kind", None) == "q4_1" else 4)
            else:
                w = quantize(source, 4)
            if self.fit_cache is not None:
                self.fit_cache.add(source, w)
        elif not isinstance(w, Blocks):
            w = quantize(w, bits)
        n_out, n_in = w.shape
        nb = n_in // w.block
        # MatMulNBits is fastest without a zero-point input (implicit 8 for 4 bits, 128 for 8).
        # Any other zero point z, and Q4_1's offset m, become one exact per-block offset:
        #     s*(q - z) + m  =  s*(q - default) + [m + s*(default - z)]
        bits_out = 4 if (bits == 4 and w.bits == 4) else 8
        default = 8 if bits_out == 4 else 128
        q = w.q.view(np.uint8) ^ np.uint8(0x80) if w.q.dtype == np.int8 else w.q  # signed int8 + 128, as uint8
        z = (w.zero.astype(np.float32) if w.zero is not None else 0.0) + (128 if w.q.dtype == np.int8 else 0)
        offset0 = (w.offset if w.offset is not None else 0.0) + w.scale * (default - z)
        q = q.astype(np.uint8, copy=False).reshape(n_out, nb, w.block)
        t = {"n_in": n_in, "n_out": n_out, "block": w.block, "default_zp": default, "split": False,
             "offset_rows": None}
        scale = w.scale
        offset, t["zp"] = offset0, None
        if (bits_out == 4 and w.zero is not None and w.offset is None and w.q.dtype != np.int8
                and np.any(w.zero != default)):
            # Integer zero points (our asymmetric int4) go in as MatMulNBits' uint8 input: exact,
            # as fast on CPU, and no correction ops (which cost kernel launches on CUDA).
            zp = w.zero.astype(np.uint8)
            if nb % 2:
                zp = np.concatenate([zp, np.zeros((n_out, 1), np.uint8)], axis=1)
            t["zp"] = g.weight(base + ".zp", pack_uint4(zp))
            offset = np.zeros_like(offset0)
        if bits_out == 8 and w.kind == "uint8" and not self.split8:
            # fitted 8-bit codes with integer zero points (int4_fit, bits=8): MatMulNBits' own form
            t["zp"] = g.weight(base + ".zp", w.zero.astype(np.uint8))
            offset = np.zeros_like(offset0)
        if (bits_out == 8 and w.q.dtype == np.uint8 and w.kind in GGUF_UINT8_KINDS and not self.split8
                and self.dtype == np.float32):  # CUDA (fp16) packages keep the form they had
            # unsigned GGUF codes at 8 bits (Q5_1, Q5_K; 4-bit blocks read as an 8-bit table):
            # their own zero points (0 without one) keep s*(q - z) exact and small, and the offset
            # term carries m alone (s*(q - 128) + [m + s*(128 - z)] cancels, and int8
            # activations' error would scale with q - 128)
            zero = w.zero if w.zero is not None else np.zeros(w.scale.shape, np.uint8)
            t["zp"] = g.weight(base + ".zp", np.ascontiguousarray(zero, np.uint8))
            offset = w.offset if w.offset is not None else np.zeros_like(offset0)
        if bits_out == 4 and w.offset is not None and self.augment_offsets:
            q, scale, offset = self.ops.augment(t, w, q, base)
        t["scale"] = g.weight(base + ".scale", scale.astype(self.dtype))
        if bits_out == 4:
            t.update(bits=4, B=g.weight(base + ".B", pack_uint4(q).reshape(n_out, q.shape[1], w.block // 2)))
        elif self.split8:
            # ORT's 8-bit kernel at accuracy 1 is ~100x slower than its 4-bit one, so an exact
            # 8-bit matrix runs as two 4-bit halves:  u - 128 = 16(hi - 8) + (lo - 8) + 8
            hi, lo = q >> 4, q & 0x0F
            t.update(bits=4, split=True, B=g.weight(base + ".Bhi", pack_uint4(hi).reshape(n_out, nb, w.block // 2)),
                     B_lo=g.weight(base + ".Blo", pack_uint4(lo).reshape(n_out, nb, w.block // 2)))
            offset = offset0 + 8.0 * w.scale
        else:
            t.update(bits=8, B=g.weight(base + ".B", q))
        t["offset"] = g.weight(base + ".offset", offset.T.astype(self.dtype)) if np.any(offset != 0) else None
        if bits_out == 8 and w.kind != "uint8" and np.any(offset0 != 0):  # the embedding gathers offsets by row
            t["offset_rows"] = g.weight(base + ".offset_rows", np.asarray(offset0).astype(self.dtype))
        self._emitted[key] = t
        return t

    def refine_top(self, x: str, logits: str, name: str, k: int) -> str:
        """Float logits for the k best candidates of a head computed with int8 activations, so
        greedy picks match float arithmetic (near-ties flip otherwise) for k table rows' work::

            logits --TopK--> idx [B, 1, k] --table rows--> [B, k, E] --x·rowsᵀ--> [B, 1, k]
            ScatterElements(logits, idx, exact)
        """
        g = self.g
        _, idx = g.op("TopK", [logits, g.const([k])], n_out=2, axis=-1)
        ids = g.op("Squeeze", [idx, g.const([1])])
        rows = self.ops.nbits_rows(ids, self._nbits(name, 8))
        exact = g.matmul(x, g.transpose(rows, [0, 2, 1]))
        return g.op("ScatterElements", [logits, idx, exact], axis=-1)

    # --- embeddings ---------------------------------------------------------------------------
    def embedding(self, ids: str, name: str, bits: int | None = -1) -> str:
        """Rows of the [vocab, hidden] table for ``ids`` [B, S] -> [B, S, hidden].

        The table is stored transposed (as the tied lm_head wants it), so rows are gathered
        along axis 1 and dequantized block-wise after the gather.
        """
        bits = PRECISION_BITS[self.precision] if bits == -1 else bits
        if self.nbits_accuracy is not None and bits is not None:  # the lm_head's MatMulNBits table: stored once
            return self.ops.nbits_rows(ids, self._nbits(name, 8))
        return self.ops.dequant_rows(ids, self._emit(name, bits, packed4=False, table=True))

    # --- conversion ---------------------------------------------------------------------------
    def _dense(self, w) -> np.ndarray:
        return w.dequantize() if isinstance(w, Blocks) else np.asarray(w, dtype=np.float32)

    def _matrix(self, name: str, table: bool = False):
        """A source matrix in HF Linear layout [out, in]. GPT-2's Conv1D linears are stored
        [in, out]; its embedding tables (wte, tied to the lm_head, and wpe) are [rows, hidden]."""
        if name in self._stacked:
            w = self._stacked.pop(name)
            return w() if callable(w) else w  # a stack an earlier graph decided (see stack)
        w = self.source.get(name)
        if self.transposed and not table and not isinstance(w, Blocks) and w.ndim == 2 and "wte" not in name:
            w = w.T
        return w

    def _emit(self, name: str, bits: int | None, packed4: bool = True, table: bool = False) -> dict:
        if name in self._emitted:
            return self._emitted[name]
        w = self._matrix(name, table)
        n_out, n_in = w.shape
        if bits is not None and n_in % BLOCK:
            logger.info("%s: input size %d is not a multiple of %d, kept in float", name, n_in, BLOCK)
            bits = None
        if bits is None:
            dense = self._dense(w).T.astype(self.dtype)
            t = {"kind": "dense", "w": self.g.weight(_init_name(name, "T"), dense)}
        else:
            if not isinstance(w, Blocks):
                w = quantize(w, bits)
            t = self.ops.emit_blocks(_init_name(name, ""), w, packed4)
        t["in"] = n_in
        self._emitted[name] = t
        return t


def _init_name(hf_name: str, suffix: str) -> str:
    return hf_name.removesuffix(".weight").removesuffix(".bias") + ("." + suffix if suffix else "") + (
        ".bias" if hf_name.endswith(".bias") else "")

"""The fused decoder variant for ONNX Runtime's CPU and CUDA providers (com.microsoft ops).

Same contract as the portable graph, except that logits come for the last position only. It
swaps the portable subgraphs for ONNX Runtime's fused kernels::

    residual add + RMSNorm     Add, ReduceMean, Sqrt, Div, Mul  ->  SkipSimplifiedLayerNormalization
    RMSNorm                    ReduceMean, Sqrt, Div, Mul       ->  SimplifiedLayerNormalization
    rotary embedding           Cos, Sin, Split, Neg, Concat     ->  RotaryEmbedding (cached tables)
    block-quantized linear     DequantizeLinear + MatMul        ->  MatMulNBits (4 and 8 bits)
    q/k/v and gate/up          three / two matmuls of one input ->  one matmul on stacked weights
    attention                  MatMul, Where, Softmax, MatMul   ->  GroupQueryAttention
    lm_head                    every position                   ->  last position only, int8
                                                                    activations, top 16 in float

GroupQueryAttention takes the whole visibility mask (causal, left padding, sliding window) as an
additive ``attention_bias`` [B, 1, S, T], so left-padded batches stay exact; it is told that
every row holds T keys. Rotary embedding runs just before it (RotaryEmbedding with the real
position ids, which left padding shifts). One ONNX Runtime limit: a call with batch > 1 and
several new tokens after a non-empty past is refused (the runtime splits such calls by row).
Models whose rotary tables cannot be cached (partial rotary) keep the masked-softmax attention.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from portable_infer.package import manifest as mf

from .decoder import DecoderBuilder

MS = "com.microsoft"
_MAX_ROPE_CACHE_BYTES = 64 << 20
I32 = TensorProto.INT32
# Candidates whose logits the int8-activation lm_head recomputes in float (see WeightStore.refine_top).
REFINE_TOP = 16
# Additive bias for hidden keys: far below any score, yet finite after adding one (fp16: -65504
# plus a negative score would overflow to -inf and turn fully hidden padding rows into NaN).
_HIDDEN = {np.float32: -3.0e38, np.float16: -1.0e4}


class FusedDecoderBuilder(DecoderBuilder):
    logits_positions = 1

    @property
    def attention_op(self) -> str:
        """"gqa" (GroupQueryAttention) or "masked" (the portable MatMul/Softmax form)."""
        return "gqa" if self.L.positions != "rope" or self._rope_cache_ok() else "masked"

    def stacked_linear(self, x: str, i: int, roles: tuple) -> str | None:
        """One matmul over the row-stacked weights of ``roles`` (same input), or None when their
        storage formats (or biases) differ."""
        names = [self.req(r, i) for r in roles]
        biases = [self.name(r + "_bias", i) for r in roles]
        if any(biases) and not all(biases):
            return None
        key = self.w.stack(names, f"{names[0]}+stacked")
        if key is None:
            return None
        bias = self.w.stack(biases, f"{biases[0]}+stacked") if all(biases) else None
        return self.w.linear(x, key, bias)

    def projections(self, x: str, i: int, roles: tuple, sizes: list) -> list:
        y = self.stacked_linear(x, i, roles)
        return super().projections(x, i, roles, sizes) if y is None else self.g.split(y, sizes, axis=-1)

    def attention_inputs(self, ids: str, mask: str, layer_type: str):
        if self.attention_op != "gqa":
            return super().attention_inputs(ids, mask, layer_type)
        #  visible [B, 1, S, T] -> Where(0, hidden) = attention_bias ; T -> total length, seqlens_k = T - 1
        g = self.g
        bias = g.where(self.visible(ids, mask, layer_type), g.const(0.0, self.dtype),
                       g.const(_HIDDEN[self.dtype], self.dtype))
        total = g.cast(g.op("Squeeze", [g.shape(mask, 1, 2)]), I32)
        seqlens = g.op("Expand", [g.sub(total, g.const(1, np.int32)), g.shape(ids, 0, 1)])
        return bias, seqlens, total

    def self_attention(self, i: int, q: str, k: str, v: str, past: tuple, mask, rope: tuple | None):
        if self.attention_op != "gqa":
            return super().self_attention(i, q, k, v, past, mask, rope)
        d, (bias, seqlens, total) = self.d, mask
        if rope is not None:
            q, k = self.rope(q, rope), self.rope(k, rope)  # [B, S, n*D]
        out, k, v = self.g.op(
            "GroupQueryAttention", [q, k, v, past[0], past[1], seqlens, total, "", "", "", bias],
            n_out=3, name=[None, *mf.present_names(i)], domain=MS, num_heads=d.num_heads,
            kv_num_heads=d.num_kv_heads, scale=float(self.L.attn_scale))
        return out, k, v

    def add_norm(self, h: str, delta: str | None, role: str, i: int | None = None) -> tuple[str, str]:
        if delta is None:
            return self.norm(h, role, i), h
        g, w_name = self.g, self.req(role, i)
        gamma = self.w.vector(w_name, add=self.L.norm_offset)
        if self.L.norm == "layer":
            bias = self.name(role + "_bias", i)
            out = g.op("SkipLayerNormalization", [h, delta, gamma] + ([self.w.vector(bias)] if bias else []),
                       n_out=4, domain=MS, epsilon=float(self.L.norm_eps))
        else:
            out = g.op("SkipSimplifiedLayerNormalization", [h, delta, gamma], n_out=4, domain=MS,
                       epsilon=float(self.L.norm_eps))
        return out[0], out[3]

    def norm(self, x: str, role: str, i: int | None = None) -> str:
        if self.L.norm == "layer":
            return super().norm(x, role, i)
        gamma = self.w.vector(self.req(role, i), add=self.L.norm_offset)
        return self.g.op("SimplifiedLayerNormalization", [x, gamma], axis=-1, epsilon=float(self.L.norm_eps),
                         stash_type=1)

    def _rope_cache_ok(self) -> bool:
        # Partial rotary keeps the portable subgraph: RotaryEmbedding then needs num_heads, which
        # differs between q and k under GQA, and num_heads=0 fails when the session starts.
        return (self.L.rotary_dim == self.d.head_dim
                and self.d.max_context * self.L.rotary_dim * 4 <= _MAX_ROPE_CACHE_BYTES)

    def rope_tables(self, pos: str, layer_type: str):
        if not self._rope_cache_ok():
            return super().rope_tables(pos, layer_type)
        freqs = np.outer(np.arange(self.d.max_context, dtype=np.float32), self.L.inv_freq[layer_type])
        g = self.g
        cos = g.weight(f"rope.{layer_type}.cos", np.cos(freqs).astype(self.dtype))
        sin = g.weight(f"rope.{layer_type}.sin", np.sin(freqs).astype(self.dtype))
        return ("cache", cos, sin, pos)

    def rope(self, x: str, tables) -> str:
        if tables[0] != "cache":
            return super().rope(x, tables)
        _, cos, sin, pos = tables
        return self.g.op("RotaryEmbedding", [x, pos, cos, sin], domain=MS, interleaved=0)

    def lm_head(self, h: str) -> str:
        name, bits, acc = self.lm_head_name(), self._embed_bits(), self.w.head_accuracy
        form = self.w.head_form if bits is not None else "fp32"
        if form == "int4":  # the table at 4 bits, whatever the source's width
            self.w.fit_8bit.add(name)
        if form in ("fp32", "int4"):
            return self.w.linear(h, name, bits=None if form == "fp32" else 4, accuracy=acc)
        logits = self.w.linear(h, name, bits=bits, accuracy=acc)
        if form == "int8" or acc == 1:
            return logits
        return self.w.refine_top(h, logits, name, REFINE_TOP)

    def head(self, h: str, delta: str) -> str:
        last = lambda t: self.g.slice(t, [-1], [np.iinfo(np.int64).max], [1])  # noqa: E731  [B, 1, E]
        return super().head(last(h), last(delta))

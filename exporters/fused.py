"""The fused decoder variant for ONNX Runtime's CPU and CUDA providers (com.microsoft ops).

Same contract as the portable graph, except that logits come for the last position only. It
swaps the portable subgraphs for ONNX Runtime's fused kernels::

    residual add + RMSNorm     Add, ReduceMean, Sqrt, Div, Mul  ->  SkipSimplifiedLayerNormalization
    RMSNorm                    ReduceMean, Sqrt, Div, Mul       ->  SimplifiedLayerNormalization
    rotary embedding           Cos, Sin, Split, Neg, Concat     ->  RotaryEmbedding (cached tables)
    block-quantized linear     DequantizeLinear + MatMul        ->  MatMulNBits (4 and 8 bits)
    lm_head                    every position                   ->  last position only

Attention itself keeps the portable masked-softmax form: it honours left padding exactly, which
ONNX Runtime's GroupQueryAttention (right-padded sequence lengths) does not.
"""

from __future__ import annotations

import numpy as np

from .decoder import DecoderBuilder

MS = "com.microsoft"
_MAX_ROPE_CACHE_BYTES = 64 << 20


class FusedDecoderBuilder(DecoderBuilder):
    logits_positions = 1

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

    def head(self, h: str, delta: str) -> str:
        last = lambda t: self.g.slice(t, [-1], [np.iinfo(np.int64).max], [1])  # noqa: E731  [B, 1, E]
        return super().head(last(h), last(delta))

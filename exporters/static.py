"""The static-KV decoder variant: fixed-size cache buffers shared by past and present (CUDA graphs).

The fused graph's ops, with one change of contract: the cache is a preallocated buffer
``[B, KVH, capacity, D]`` that ``past_key_values.i.*`` and ``present.i.*`` name together (the
runtime binds both to the same memory), and every row holds its own tokens from index 0 up
(right-aligned rows, no padding inside)::

    input_ids [B, S]                 the new tokens (a shorter prompt in a batched prefill is
                                     padded on the right)
    attention_mask [B, T]            row b: ones over its n_b tokens so far, new ones included,
                                     zeros after; T = S at prefill, T = capacity afterwards
    past/present [B, KVH, capacity, D]   one buffer per name pair; GroupQueryAttention writes
                                     the new keys at [n_b - S, n_b) and reads [0, n_b)

No position_ids: positions are the row's own indices, which GroupQueryAttention's rotary
(``do_rotary``, cached cos/sin tables) derives from the lengths. Logits come for each row's last
real new token, and ``next_token`` [B, 1] their argmax (greedy decoding then copies one id per
row to the host, not the logits). A decode step therefore has the same shapes on every call, which is what CUDA
graph capture needs. The runtime builds these for rotary models without sliding windows only.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from portable_infer.package import manifest as mf

from .fused import _MAX_ROPE_CACHE_BYTES, I32, MS, FusedDecoderBuilder


class StaticDecoderBuilder(FusedDecoderBuilder):
    position_input = False
    kv_dims = ("kv_capacity", "kv_capacity")
    kv_growth = "static"

    @staticmethod
    def supports(layout) -> bool:
        """Rotary models whose tables fit the cache, without sliding-window layers."""
        d = layout.dims
        return (layout.positions == "rope" and layout.rotary_dim == d.head_dim
                and set(d.layer_types) == {"full_attention"}
                and d.max_context * layout.rotary_dim * 4 <= _MAX_ROPE_CACHE_BYTES)

    def attention_inputs(self, ids: str, mask: str, layer_type: str):
        #  mask [B, T] -> float -> ReduceSum - 1 -> int32 = seqlens_k [B] (each row's last token)
        #  No shape arithmetic: every node stays on the provider (CUDA graphs need that).
        g = self.g
        if self._total is None:
            self._total = g.input(mf.TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, [])
        seqlens = g.cast(g.sub(self._lengths(), g.const(1.0, np.float32)), I32)
        return seqlens, self._total

    def _lengths(self) -> str:
        """Tokens per row (float [B]): ReduceSum of the mask, built once per graph."""
        if self._n is None:
            self._n = self.g.reduce_sum(self.g.cast(mf.ATTENTION_MASK, TensorProto.FLOAT), [1], keepdims=0)
        return self._n

    def qkv(self, x: str, i: int):
        """q, k and v packed in one tensor (GroupQueryAttention splits it itself: no Split node),
        unless q/k are normed per head in between."""
        if not self.L.qk_norm:
            packed = (self.w.linear(x, self.req("qkv", i), self.name("qkv_bias", i)) if self.name("qkv", i)
                      else self.stacked_linear(x, i, ("q", "k", "v")))
            if packed is not None:
                return packed, "", ""
        return super().qkv(x, i)

    def self_attention(self, i: int, q: str, k: str, v: str, past: tuple, mask, rope):
        d, (seqlens, total) = self.d, mask
        _, cos, sin, _ = rope
        out, k, v = self.g.op(
            "GroupQueryAttention", [q, k, v, past[0], past[1], seqlens, total, cos, sin],
            n_out=3, name=[None, *mf.present_names(i)], domain=MS, num_heads=d.num_heads,
            kv_num_heads=d.num_kv_heads, scale=float(self.L.attn_scale), do_rotary=1, rotary_interleaved=0)
        return out, k, v

    def build(self, on_layer=None) -> None:
        self._total = self._n = None
        super().build(on_layer)
        #  greedy on the device: ArgMax of the logits (first index on ties, like numpy's argmax)
        token = self.g.op("ArgMax", [mf.LOGITS], axis=-1, keepdims=0, select_last_index=0)
        self.g.output(token, mf.NEXT_TOKEN, TensorProto.INT64, ["batch", 1])

    def head(self, h: str, delta: str) -> str:
        #  row b's last real new token: min(n_b, S) - 1  (prefill: n_b - 1; later steps: S - 1),
        #  S counted on the device (ReduceSum of ones over ids), then GatherND per row -> [B, 1, E]
        g = self.g
        n = self._lengths()
        ones = g.cast(g.op("GreaterOrEqual", [mf.INPUT_IDS, g.const(0)]), TensorProto.FLOAT)
        s = g.reduce_sum(ones, [1], keepdims=0)
        idx = g.unsqueeze(g.cast(g.sub(g.op("Min", [n, s]), g.const(1.0, np.float32)), TensorProto.INT64), [1])
        pick = lambda t: g.unsqueeze(g.op("GatherND", [t, idx], batch_dims=1), [1])  # noqa: E731
        return super(FusedDecoderBuilder, self).head(pick(h), pick(delta))

"""The portable decoder graph: standard ONNX ops only, one graph for prefill and decode.

Contract (names from :mod:`portable_infer.package.manifest`)::

    input_ids [B, S] int64 ─┐                                   ┌─> logits [B, S, vocab] fp32
    attention_mask [B, T]  ─┤  T = past + S   (left padding:    ├─> present.i.key   [B, KVH, T, D]
    position_ids [B, S]    ─┤   zeros in the mask, positions    └─> present.i.value [B, KVH, T, D]
    past_key_values.i.*    ─┘   counted over real tokens only)
        [B, KVH, past, D]

Each layer::

    h ──> norm ──> q,k,v ──> (q/k norm) ──> rope ──> concat(past) ──> attention ──> o ──(+h)──> ...
                                                                      │ scores = q·kᵀ·scale
    ... ──> norm ──> gate/up ──> act(gate)·up ──> down ──(+)──>       │ masked where key > query,
                                                                      │ key is padding, or outside
                                                                      │ the sliding window
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from portable_infer.package import manifest as mf

from .architectures.common import DecoderLayout
from .graph import GraphBuilder
from .weights import WeightStore

F32 = TensorProto.FLOAT
I64 = TensorProto.INT64


class DecoderBuilder:
    logits_positions = "sequence"  # logits for every position (teacher forcing, verification)
    position_input = True  # position_ids is a graph input
    kv_dims = ("past_sequence", "total_sequence")  # past and present lengths: the cache grows
    kv_growth = "concat"

    def __init__(self, layout: DecoderLayout, store: WeightStore):
        self.L = layout
        self.d = layout.dims
        self.w = store
        self.g = store.g
        self.dtype = store.dtype
        self.kv_type = store.onnx_dtype

    # --- whole graph --------------------------------------------------------------------------
    def build(self, on_layer=None) -> None:
        g, d = self.g, self.d
        ids = g.input(mf.INPUT_IDS, I64, ["batch", "sequence"])
        mask = g.input(mf.ATTENTION_MASK, I64, ["batch", "total_sequence"])
        pos = g.input(mf.POSITION_IDS, I64, ["batch", "sequence"]) if self.position_input else None
        kv_shape = ["batch", d.num_kv_heads, self.kv_dims[0], d.head_dim]
        pasts = [tuple(g.input(n, self.kv_type, kv_shape) for n in mf.past_names(i)) for i in range(d.num_layers)]

        h = self.embed(ids, pos)
        masks = {t: self.attention_inputs(ids, mask, t) for t in set(d.layer_types)}
        ropes = {t: self.rope_tables(pos, t) for t in set(d.layer_types)} if self.L.positions == "rope" else {}
        presents, delta = [], None
        for i in range(d.num_layers):
            t = d.layer_types[i]
            h, delta, k, v = self.layer(i, h, delta, pasts[i], masks[t], ropes.get(t))
            presents.append((k, v))
            if on_layer is not None:
                on_layer(1)
        g.output(self.head(h, delta), mf.LOGITS, F32, ["batch", self.logits_positions, d.vocab_size])
        out_shape = ["batch", d.num_kv_heads, self.kv_dims[1], d.head_dim]
        for i, kv in enumerate(presents):
            for value, name in zip(kv, mf.present_names(i)):
                g.output(value, name, self.kv_type, out_shape)

    def name(self, role: str, i: int | None = None) -> str | None:
        n = self.L.names.get(role)
        if n is None:
            return None
        n = n.format(i=i)
        return n if self.w.source.has(n) else None

    def req(self, role: str, i: int | None = None) -> str:
        """A tensor the layout requires; a missing one fails in the source with its name."""
        return self.L.names[role].format(i=i)

    # --- embeddings and head ------------------------------------------------------------------
    def embed(self, ids: str, pos: str) -> str:
        g = self.g
        h = self.w.embedding(ids, self.req("embed"), bits=self._embed_bits())
        if self.L.positions == "learned":
            h = g.add(h, self.w.embedding(pos, self.req("pos_embed"), bits=None))
        if self.L.embed_scale is not None:
            h = g.mul(h, g.const(self.L.embed_scale, self.dtype))
        return h

    def _embed_bits(self):
        # Embedding / lm_head tables are large and quality-sensitive: 8 bits at int4/int8 with fp32
        # activations (CPU). With fp16 activations (GPU packages) the table stays dense fp16: a
        # GPU reads it in microseconds, while 8-bit MatMulNBits on CUDA dequantizes it every step.
        if self.w.precision in ("fp32", "fp16") or self.dtype == np.float16:
            return None
        return 8

    def head(self, h: str, delta: str) -> str:
        g = self.g
        h, _ = self.add_norm(h, delta, "final_norm")
        logits = self.lm_head(h)
        if self.dtype != np.float32:
            logits = g.cast(logits, F32)
        if self.L.final_logit_softcap:
            cap = g.const(self.L.final_logit_softcap, np.float32)
            logits = g.mul(g.tanh(g.div(logits, cap)), cap)
        return logits

    def lm_head_name(self) -> str:
        lm = self.name("lm_head")
        return self.req("embed") if self.d.tie_word_embeddings or lm is None else lm

    def lm_head(self, h: str) -> str:
        return self.w.linear(h, self.lm_head_name(), bits=self._embed_bits())

    # --- norms --------------------------------------------------------------------------------
    def add_norm(self, h: str, delta: str | None, role: str, i: int | None = None) -> tuple[str, str]:
        """(norm(h + delta), h + delta): the residual add and the norm that follows it."""
        if delta is not None:
            h = self.g.add(h, delta)
        return self.norm(h, role, i), h

    def norm(self, x: str, role: str, i: int | None = None) -> str:
        """RMSNorm (in float32, as transformers computes it) or LayerNorm."""
        g = self.g
        w_name = self.req(role, i)
        if self.L.norm == "layer":
            bias = self.name(role + "_bias", i)
            inputs = [x, self.w.vector(w_name)] + ([self.w.vector(bias)] if bias else [])
            return g.op("LayerNormalization", inputs, axis=-1, epsilon=float(self.L.norm_eps))
        #  x -> float32 -> x / sqrt(mean(x²) + eps) -> * w -> dtype
        xf = x if self.dtype == np.float32 else g.cast(x, F32)
        ms = g.reduce_mean(g.mul(xf, xf), [-1])
        y = g.div(xf, g.sqrt(g.add(ms, g.const(self.L.norm_eps, np.float32))))
        y = g.mul(y, self.w.vector(w_name, np.float32, add=self.L.norm_offset))
        return y if self.dtype == np.float32 else g.cast(y, self.kv_type)

    # --- attention helpers --------------------------------------------------------------------
    def attention_inputs(self, ids: str, mask: str, layer_type: str) -> str:
        """What :meth:`attention` takes besides q/k/v: the visibility mask, tiled to [B, 1, rep*S, T]."""
        rep = self.d.num_heads // self.d.num_kv_heads
        allowed = self.visible(ids, mask, layer_type)
        return allowed if rep == 1 else self.g.op("Tile", [allowed, self.g.const([1, 1, rep, 1])])

    def visible(self, ids: str, mask: str, layer_type: str) -> str:
        """Boolean [B, 1, S, T]: True where query s may attend to key t.

        Query s sits at absolute index T - S + s. A key is visible when it is not after the
        query, is not padding, and (sliding layers) lies within the window.
        """
        g = self.g
        S = g.shape(ids, 1, 2)
        T = g.shape(mask, 1, 2)
        kpos = g.op("Range", [g.const(0), g.op("Squeeze", [T]), g.const(1)])
        qpos = g.op("Range", [g.op("Squeeze", [g.sub(T, S)]), g.op("Squeeze", [T]), g.const(1)])
        k_row, q_col = g.unsqueeze(kpos, [0]), g.unsqueeze(qpos, [1])
        allowed = g.op("LessOrEqual", [k_row, q_col])  # [S, T]
        window = self.d.sliding_window if layer_type == "sliding_attention" else None
        if window:
            allowed = g.op("And", [allowed, g.op("Greater", [k_row, g.sub(q_col, g.const(window))])])
        pad = g.unsqueeze(g.cast(mask, TensorProto.BOOL), [1, 2])  # [B, 1, 1, T]
        return g.op("And", [allowed, pad])  # [B, 1, S, T]


    def rope_tables(self, pos: str, layer_type: str) -> tuple[str, str]:
        """cos, sin [B, 1, S, rotary_dim] from position_ids and the layer type's frequencies."""
        g = self.g
        freqs = g.mul(g.unsqueeze(g.cast(pos, F32), [-1]), g.const(self.L.inv_freq[layer_type], np.float32))
        emb = g.unsqueeze(g.concat([freqs, freqs], axis=-1), [1])
        cos, sin = g.op("Cos", [emb]), g.op("Sin", [emb])
        if self.dtype != np.float32:
            cos, sin = g.cast(cos, self.kv_type), g.cast(sin, self.kv_type)
        return cos, sin

    def rope(self, x: str, tables: tuple[str, str]) -> str:
        """x·cos + rotate_half(x)·sin on the first rotary_dim channels of x [B, H, S, D]."""
        g = self.g
        cos, sin = tables
        rd, D = self.L.rotary_dim, self.d.head_dim
        rot, rest = (x, None) if rd == D else g.split(x, [rd, D - rd], axis=-1)
        x1, x2 = g.split(rot, [rd // 2, rd // 2], axis=-1)
        rotated = g.concat([g.neg(x2), x1], axis=-1)
        out = g.add(g.mul(rot, cos), g.mul(rotated, sin))
        return out if rest is None else g.concat([out, rest], axis=-1)

    def heads(self, x: str, n: int) -> str:
        """[B, S, n*D] -> [B, n, S, D]"""
        return self.g.transpose(self.g.reshape(x, [0, 0, n, self.d.head_dim]), [0, 2, 1, 3])

    # --- one layer ----------------------------------------------------------------------------
    def layer(self, i: int, h: str, delta: str | None, past: tuple, mask, rope: tuple | None):
        """One block. The residual add of the previous block's output (``delta``) happens here,
        next to the norm that follows it, so the fused variant can make it one op."""
        w, L = self.w, self.L
        x, h = self.add_norm(h, delta, "attn_norm", i)
        q, k, v = self.qkv(x, i)
        attn, k, v = self.self_attention(i, q, k, v, past, mask, rope)
        attn = w.linear(attn, self.req("o", i), self.name("o_bias", i))
        if L.sandwich_norm:
            attn = self.norm(attn, "post_attn_norm", i)
        x, h = self.add_norm(h, attn, "mlp_norm", i)
        m = self.mlp(x, i)
        if L.sandwich_norm:
            m = self.norm(m, "post_mlp_norm", i)
        return h, m, k, v

    def projections(self, x: str, i: int, roles: tuple, sizes: list) -> list:
        """Several linears of the same input (q/k/v, gate/up). The portable graph keeps them
        apart; the fused one stacks their weights into one matmul where the formats agree."""
        return [self.w.linear(x, self.req(r, i), self.name(r + "_bias", i)) for r in roles]

    def qkv(self, x: str, i: int) -> tuple[str, str, str]:
        """q [B, S, H*D], k and v [B, S, KVH*D] (q/k normed per head where the model does)."""
        g, d = self.g, self.d
        H, KVH, D = d.num_heads, d.num_kv_heads, d.head_dim
        if self.name("qkv", i):
            qkv = self.w.linear(x, self.req("qkv", i), self.name("qkv_bias", i))
            q, k, v = g.split(qkv, [H * D, KVH * D, KVH * D], axis=-1)
        else:
            q, k, v = self.projections(x, i, ("q", "k", "v"), [H * D, KVH * D, KVH * D])
        if self.L.qk_norm:
            q = g.reshape(self.norm(g.reshape(q, [0, 0, H, D]), "q_norm", i), [0, 0, H * D])
            k = g.reshape(self.norm(g.reshape(k, [0, 0, KVH, D]), "k_norm", i), [0, 0, KVH * D])
        return q, k, v

    def self_attention(self, i: int, q: str, k: str, v: str, past: tuple, mask: str, rope: tuple | None):
        """Attention over past + new keys: (output [B, S, H*D], present key, present value)."""
        g, d = self.g, self.d
        q, k, v = self.heads(q, d.num_heads), self.heads(k, d.num_kv_heads), self.heads(v, d.num_kv_heads)
        if rope is not None:
            q, k = self.rope(q, rope), self.rope(k, rope)
        # The concatenations are the present outputs themselves (no Identity copy of the cache).
        k_name, v_name = mf.present_names(i)
        k = g.op("Concat", [past[0], k], name=k_name, axis=2)
        v = g.op("Concat", [past[1], v], name=v_name, axis=2)
        return self.attention(q, k, v, mask), k, v

    def attention(self, q: str, k: str, v: str, allowed: str) -> str:
        """Grouped-query attention without repeating K/V.

        q [B, H, S, D] -> [B, KVH, rep*S, D] (the rep query heads of a KV head side by side),
        scores [B, KVH, rep*S, T] against k [B, KVH, T, D]; masked scores get the dtype's min
        (Where, not Add, so fully masked padding rows stay finite).
        """
        g, d = self.g, self.d
        H, KVH, D = d.num_heads, d.num_kv_heads, d.head_dim
        qg = g.reshape(q, [0, KVH, -1, D])
        scores = g.mul(g.matmul(qg, g.transpose(k, [0, 1, 3, 2])), g.const(self.L.attn_scale, self.dtype))
        if self.dtype != np.float32:
            scores = g.cast(scores, F32)
        scores = g.where(allowed, scores, g.const(np.finfo(np.float32).min, np.float32))
        probs = g.softmax(scores, axis=-1)
        if self.dtype != np.float32:
            probs = g.cast(probs, self.kv_type)
        out = g.reshape(g.matmul(probs, v), [0, H, -1, D])
        return g.reshape(g.transpose(out, [0, 2, 1, 3]), [0, 0, H * D])

    def act(self, x: str) -> str:
        g = self.g
        if self.L.activation == "silu":
            return g.mul(x, g.sigmoid(x))
        approximate = "tanh" if self.L.activation == "gelu_tanh" else "none"
        return g.op("Gelu", [x], approximate=approximate)

    def mlp(self, x: str, i: int) -> str:
        g, w, I = self.g, self.w, self.d.intermediate_size
        if not self.L.gated_mlp:
            up = w.linear(x, self.req("up", i), self.name("up_bias", i))
            return w.linear(self.act(up), self.req("down", i), self.name("down_bias", i))
        if self.name("gate_up", i):
            gate, up = g.split(w.linear(x, self.req("gate_up", i)), [I, I], axis=-1)
        else:
            gate, up = self.projections(x, i, ("gate", "up"), [I, I])
        return w.linear(g.mul(self.act(gate), up), self.req("down", i), self.name("down_bias", i))

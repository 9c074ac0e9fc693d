"""The decoder graph: one builder for every variant, one prefill-and-decode graph per variant.

Contract (names from :mod:`portable_infer.package.manifest`)::

    input_ids [B, S] int64 ─┐                                   ┌─> logits [B, S | 1, vocab] fp32
    attention_mask [B, T]  ─┤  T = past + S   (left padding:    ├─> present.i.key   [B, KVH, T, D]
    position_ids [B, S]    ─┤   zeros in the mask, positions    ├─> present.i.value [B, KVH, T, D]
    past_key_values.i.*    ─┘   counted over real tokens only)  └─> next_token [B, 1] (static)
        [B, KVH, past, D]

Each layer::

    h ──> norm ──> q,k,v ──> (q/k norm) ──> rope ──> attention (past) ──> o ──(+h)──>
    ... ──> norm ──> gate/up ──> act(gate)·up ──> down ──(+)──>

Which form each step takes (portable ONNX ops, ONNX Runtime's fused kernels, fixed KV buffers) is
the variant's ``lowering.variant_spec.VariantSpec``; the forms are in ``exporters/lowering/``. The
residual add of a block's output happens in the next norm (``norm.add_norm``), so the fused form
can make the two one op. The static variant (fixed buffers ``[B, KVH, capacity, D]`` shared by
past and present, every row's tokens from index 0, no ``position_ids``, ``total_sequence_length``
input) is described in ``lowering/attention.py`` and ``lowering/head.py``.
"""

from __future__ import annotations

from onnx import TensorProto

from portable_infer.package import manifest as mf

from .architectures.common import DecoderLayout
from .lowering import attention, head, linear, norm, rotary
from .lowering.context import LoweringContext
from .lowering.variant_spec import VariantSpec
from .weights import WeightStore

F32 = TensorProto.FLOAT
I64 = TensorProto.INT64
# spec.kv -> the KV inputs' and outputs' sequence dimensions
KV_DIMS = {"concat": ("past_sequence", "total_sequence"), "static": ("kv_capacity", "kv_capacity")}
PAGED_KV = ["kv_blocks", "block_size"]  # paged: the pool's leading dimensions (then KVH, D)


class DecoderBuilder:
    """Builds ``layout``'s decoder into ``store``'s graph in the forms ``spec`` names."""

    def __init__(self, layout: DecoderLayout, store: WeightStore, spec: VariantSpec):
        self.c = LoweringContext(store.g, store, layout, spec)

    def build(self, on_layer=None) -> None:
        """The whole graph; ``on_layer(1)`` after each layer (a progress bar)."""
        for _ in self.steps(on_layer):
            pass

    def steps(self, on_layer=None):
        """:meth:`build` a step at a time: yields after the embedding and after each layer, so that
        several graphs can be built side by side (export.py builds the portable graph and the first
        fused-family one layer by layer: each float weight is read and rounded once for both)."""
        c = self.c
        g, d, spec = c.g, c.dims, c.spec
        paged = spec.kv == "paged"  # one row of packed tokens, no mask: lowering/paged.py
        ids = g.input(mf.INPUT_IDS, I64, [1, "tokens"] if paged else ["batch", "sequence"])
        mask = None if paged else g.input(mf.ATTENTION_MASK, I64, ["batch", "total_sequence"])
        pos = g.input(mf.POSITION_IDS, I64, ["batch", "sequence"]) if spec.position_ids else None
        past_dim, present_dim = KV_DIMS.get(spec.kv, (None, None))
        kv_shape = [*PAGED_KV, d.num_kv_heads, d.head_dim] if paged else ["batch", d.num_kv_heads, past_dim, d.head_dim]
        pasts = [tuple(g.input(n, c.kv_type, kv_shape) for n in mf.past_names(i)) for i in range(d.num_layers)]

        h = self.embed(ids, pos)
        yield
        types = tuple(dict.fromkeys(d.layer_types))  # in first-use order: the graph is the same every run
        masks = {t: attention.inputs(c, ids, mask, t) for t in types}
        ropes = {t: rotary.tables(c, pos, t) for t in types} if c.layout.positions == "rope" else {}
        presents, delta = [], None
        for i in range(d.num_layers):
            t = d.layer_types[i]
            h, delta, k, v = self.layer(i, h, delta, pasts[i], masks[t], ropes.get(t))
            presents.append((k, v))
            if on_layer is not None:
                on_layer(1)
            yield
        logits = head.logits(c, h, delta)
        rows = "sequences" if paged else "batch"
        g.output(logits, mf.LOGITS, F32, [rows, head.POSITION_DIM[spec.logits], d.vocab_size])
        out_shape = kv_shape if paged else ["batch", d.num_kv_heads, present_dim, d.head_dim]
        for i, kv in enumerate(presents):
            for value, name in zip(kv, mf.present_names(i)):
                g.output(value, name, c.kv_type, out_shape)
        if spec.next_token:
            #  greedy on the device: ArgMax of the logits (first index on ties, like numpy's argmax)
            token = g.op("ArgMax", [mf.LOGITS], axis=-1, keepdims=0, select_last_index=0)
            g.output(token, mf.NEXT_TOKEN, I64, [rows, 1])

    def embed(self, ids: str, pos: str | None) -> str:
        """Token rows (+ learned position rows) (× the embedding scale)."""
        c = self.c
        h = c.w.embedding(ids, c.req("embed"), bits=c.w.form.table_bits)
        if c.layout.positions == "learned":
            h = c.g.add(h, c.w.embedding(pos, c.req("pos_embed"), bits=None))
        if c.layout.embed_scale is not None:
            h = c.g.mul(h, c.g.const(c.layout.embed_scale, c.dtype))
        return h

    def layer(self, i: int, h: str, delta: str | None, past: tuple, mask: attention.AttentionInputs,
              rope: rotary.RopeTables | None) -> tuple[str, str, str, str]:
        """Block ``i``: (residual, this block's output to add next, present key, present value)."""
        c = self.c
        x, h = norm.add_norm(c, h, delta, "attn_norm", i)
        q, k, v = linear.qkv(c, x, i)
        attn, k, v = attention.attend(c, i, q, k, v, past, mask, rope)
        attn = linear.linear(c.w, attn, c.req("o", i), c.name("o_bias", i))
        if c.layout.sandwich_norm:
            attn = norm.norm(c, attn, "post_attn_norm", i)
        x, h = norm.add_norm(c, h, attn, "mlp_norm", i)
        m = linear.mlp(c, x, i)
        if c.layout.sandwich_norm:
            m = norm.norm(c, m, "post_mlp_norm", i)
        return h, m, k, v

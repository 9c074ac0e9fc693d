"""Attention over a paged KV cache: the ``paged`` variant's form, and its CPU reference.

Every sequence of a step is packed into one row of tokens (no padding), and the keys and values
live in blocks of a pool shared by every sequence, as vLLM's PagedAttention keeps them::

    input_ids [1, T]                       the step's tokens, sequence after sequence
    cumulative_sequence_length [N + 1]     int32: sequence s owns tokens [cu[s], cu[s + 1])
    past_seqlens [N]                       int32: tokens sequence s held before this step
    block_table [N, max_blocks]            int32: sequence s's token p lives in block
                                           block_table[s, p // block_size], row p % block_size
    attention_metadata [2]                 int32, host: the step's longest new run and longest
                                           KV (bounds PagedAttention sizes its launch by, instead of
                                           reading the lengths back from the device in each layer)
    past_key_values.i.* [blocks, block_size, KVH, D]   the pool, written in place
                                           (present.i.* are the same buffers)

``paged`` (CUDA): com.microsoft PagedAttention, rotary inside, the pool updated in place.

``paged_reference`` (standard ONNX ops; any provider; what the CPU tests run): the same
arithmetic spelled out, for a graph the op cannot run on::

    token t ─> its sequence s(t) = #{s: cu[s + 1] <= t},  position p(t) = past[s] + t - cu[s]
    q, k ─> rotary at p(t) (the same cos/sin tables) ─> k, v ScatterND into the pool at
        (block_table[s, p // bs], p % bs) ─> keys of s(t): the pool's blocks block_table[s(t)]
        [T, max_blocks·bs, KVH, D] ─> scores, hidden where key index > p(t) ─> Softmax ─> · v

The reference gathers every token's whole block list, so it is for small test models only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

from portable_infer.package import manifest as mf

if TYPE_CHECKING:
    from .context import LoweringContext
    from .rotary import RopeTables

MS = "com.microsoft"
I32 = TensorProto.INT32
I64 = TensorProto.INT64


def graph_inputs(c: LoweringContext) -> dict:
    """The paged graph's step inputs (made once), by manifest name."""
    g = c.g

    def make() -> dict:
        return {mf.CUMULATIVE_SEQUENCE_LENGTH: g.input(mf.CUMULATIVE_SEQUENCE_LENGTH, I32, ["sequences_plus_1"]),
                mf.PAST_SEQLENS: g.input(mf.PAST_SEQLENS, I32, ["sequences"]),
                mf.BLOCK_TABLE: g.input(mf.BLOCK_TABLE, I32, ["sequences", "max_blocks"]),
                mf.LOGITS_INDEX: g.input(mf.LOGITS_INDEX, I64, ["sequences"]),
                mf.ATTENTION_METADATA: g.input(mf.ATTENTION_METADATA, I32, [2])}

    if "paged_inputs" not in c._once:
        c._once["paged_inputs"] = make()
    return c._once["paged_inputs"]


def _inputs(c: LoweringContext, ids: str, mask: str | None, layer_type: str) -> None:
    """The step inputs are the graph's own (:func:`graph_inputs`): no per-layer-type values."""
    graph_inputs(c)


def _packed(c: LoweringContext, q: str, k: str, v: str) -> tuple[str, str, str]:
    """[1, T, n·D] -> [T, n·D] (k and v stay "" where q packs all three)."""
    g = c.g
    flat = lambda x: g.op("Squeeze", [x, g.const([0])]) if x else ""  # noqa: E731
    return flat(q), flat(k), flat(v)


def _paged(c: LoweringContext, i: int, q: str, k: str, v: str, past: tuple, a: None,
           rope: RopeTables | None) -> tuple[str, str, str]:
    d, p = c.dims, graph_inputs(c)
    q, k, v = _packed(c, q, k, v)
    out, k_out, v_out = c.g.op(
        "PagedAttention", [q, k, v, past[0], past[1], p[mf.CUMULATIVE_SEQUENCE_LENGTH], p[mf.PAST_SEQLENS],
                           p[mf.BLOCK_TABLE], rope.cos, rope.sin, "", "", "", "", "", "", p[mf.ATTENTION_METADATA]],
        n_out=3, name=[None, *mf.present_names(i)], domain=MS, num_heads=d.num_heads,
        kv_num_heads=d.num_kv_heads, scale=float(c.layout.attn_scale), do_rotary=1, rotary_interleaved=0)
    return c.g.unsqueeze(out, [0]), k_out, v_out


# --- the reference: standard ops --------------------------------------------------------------
def _where_tokens(c: LoweringContext) -> tuple[str, str]:
    """(s(t), p(t)) int64 [T]: each token's sequence and position (made once)."""
    g, p = c.g, graph_inputs(c)

    def make() -> tuple[str, str]:
        cu = g.cast(p[mf.CUMULATIVE_SEQUENCE_LENGTH], I64)
        t = g.op("Range", [g.const(0), g.op("Squeeze", [g.shape(mf.INPUT_IDS, 1, 2)]), g.const(1)])
        ends = g.slice(cu, [1], [np.iinfo(np.int64).max], [0])  # [N]
        before = g.op("LessOrEqual", [g.unsqueeze(ends, [0]), g.unsqueeze(t, [1])])  # [T, N]
        seq = g.reduce_sum(g.cast(before, I64), [1], keepdims=0)
        pos = g.add(g.gather(g.cast(p[mf.PAST_SEQLENS], I64), seq), g.sub(t, g.gather(cu, seq)))
        return seq, pos

    return c.once("paged_where", make)


def _rotate(c: LoweringContext, x: str, n: int, rope: RopeTables, pos: str) -> str:
    """[T, n·D] -> [T, n, D] rotated at ``pos`` (the half-split form, as RotaryEmbedding's interleaved=0)."""
    g, D = c.g, c.dims.head_dim
    x = g.reshape(x, [0, n, D])
    cos, sin = (g.unsqueeze(g.gather(t, pos), [1]) for t in (rope.cos, rope.sin))  # [T, 1, D/2]
    x1, x2 = g.split(x, [D // 2, D // 2], axis=-1)
    return g.concat([g.sub(g.mul(x1, cos), g.mul(x2, sin)), g.add(g.mul(x2, cos), g.mul(x1, sin))], axis=-1)


def _reference(c: LoweringContext, i: int, q: str, k: str, v: str, past: tuple, a: None,
               rope: RopeTables | None) -> tuple[str, str, str]:
    g, d, p = c.g, c.dims, graph_inputs(c)
    H, KVH, D = d.num_heads, d.num_kv_heads, d.head_dim
    q, k, v = _packed(c, q, k, v)
    if not k:
        q, k, v = g.split(q, [H * D, KVH * D, KVH * D], axis=-1)
    seq, pos = _where_tokens(c)
    q, k = _rotate(c, q, H, rope, pos), _rotate(c, k, KVH, rope, pos)  # [T, n, D]
    v = g.reshape(v, [0, KVH, D])
    bs = g.shape(past[0], 1, 2)  # [1] block size
    table = g.cast(g.gather(p[mf.BLOCK_TABLE], seq), I64)  # [T, max_blocks]
    block = g.op("GatherElements", [table, g.unsqueeze(g.div(pos, bs), [1])], axis=1)  # [T, 1]
    where = g.concat([block, g.unsqueeze(g.op("Mod", [pos, bs]), [1])], axis=1)  # [T, 2]
    k_name, v_name = mf.present_names(i)
    keys = g.op("ScatterND", [past[0], where, k], name=k_name)
    values = g.op("ScatterND", [past[1], where, v], name=v_name)
    # every token's sequence's blocks: [T, max_blocks, bs, KVH, D] -> [T, L, KVH, D]
    seen = lambda pool: g.reshape(g.gather(pool, table), [0, -1, KVH, D])  # noqa: E731
    ks, vs = seen(keys), seen(values)
    L = g.shape(ks, 1, 2)
    visible = g.op("LessOrEqual", [g.unsqueeze(g.op("Range", [g.const(0), g.op("Squeeze", [L]), g.const(1)]), [0]),
                                   g.unsqueeze(pos, [1])])  # [T, L]
    qg = g.reshape(q, [0, KVH, H // KVH, D])  # [T, KVH, rep, D]
    scores = g.matmul(qg, g.transpose(ks, [0, 2, 3, 1]))  # [T, KVH, rep, L]
    scores = g.mul(scores, g.const(c.layout.attn_scale, c.dtype))
    if c.dtype != np.float32:
        scores = g.cast(scores, TensorProto.FLOAT)
    scores = g.where(g.unsqueeze(visible, [1, 2]), scores, g.const(np.finfo(np.float32).min, np.float32))
    probs = g.softmax(scores, axis=-1)
    if c.dtype != np.float32:
        probs = g.cast(probs, c.kv_type)
    out = g.matmul(probs, g.transpose(vs, [0, 2, 1, 3]))  # [T, KVH, rep, D]
    return g.reshape(out, [1, -1, H * D]), keys, values


# spec.attention -> (inputs, attend)
FORMS = {"paged": (_inputs, _paged), "paged_reference": (_inputs, _reference)}

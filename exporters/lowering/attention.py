"""Self-attention over the past and the new keys, in three forms.

``masked`` (standard ONNX ops; the KV cache grows by Concat)::

    q, k, v [B, S, n·D] ─> heads [B, n, S, D] ─> (rotary) ─> k, v = Concat(past, new) = present
    q [B, H, S, D] ─> [B, KVH, rep·S, D] ─┐                        (grouped-query: K/V not repeated)
                         k [B, KVH, T, D] ─┴─> MatMul(q, kᵀ)·scale ─> Where(visible, ·, min f32)
                                                ─> Softmax ─> MatMul(·, v) ─> [B, S, H·D]

``gqa`` (com.microsoft GroupQueryAttention, growing KV)::

    visible [B, 1, S, T] ─> Where(0, hidden) = attention_bias     seqlens_k = T - 1 per row
    (rotary: RotaryEmbedding on q and k) ─> GroupQueryAttention(q, k, v, past, seqlens_k, T, bias)

``paged`` / ``paged_reference``: a pool of KV blocks, the step's tokens packed (``paged.py``).

``gqa_static`` (fixed KV buffers written in place; every row's tokens from index 0)::

    mask [B, T] ─> Cast f32 ─> ReduceSum(1) = n [B] ─> n - 1 ─> Cast i32 = seqlens_k
    GroupQueryAttention(qkv packed, -, -, past, seqlens_k, total_sequence_length, cos, sin; do_rotary)

A key is visible to a query when it is not after it, is not padding and (sliding layers) lies
within the window; the static form leaves that to GroupQueryAttention's own lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

from portable_infer.package import manifest as mf

from . import paged, rotary

if TYPE_CHECKING:
    from .context import LoweringContext
    from .rotary import RopeTables

MS = "com.microsoft"
I32 = TensorProto.INT32
# Additive bias for hidden keys: far below any score, yet finite after adding one (fp16: -65504
# plus a negative score would overflow to -inf and turn fully hidden padding rows into NaN).
_HIDDEN = {np.float32: -3.0e38, np.float16: -1.0e4}


@dataclass(frozen=True)
class AttentionInputs:
    """What attention takes besides q/k/v, built once per layer type."""

    mask: str = ""  # masked: boolean visibility [B, 1, rep·S, T]; gqa: additive bias [B, 1, S, T]
    seqlens: str = ""  # GroupQueryAttention's seqlens_k [B] (int32)
    total: str = ""  # and its total_sequence_length (int32 scalar)


def inputs(c: LoweringContext, ids: str, mask: str, layer_type: str) -> AttentionInputs:
    return FORMS[c.spec.attention][0](c, ids, mask, layer_type)


def attend(c: LoweringContext, i: int, q: str, k: str, v: str, past: tuple, a: AttentionInputs,
           rope: RopeTables | None) -> tuple[str, str, str]:
    """Layer ``i``'s attention: (output [B, S, H·D], present key, present value)."""
    return FORMS[c.spec.attention][1](c, i, q, k, v, past, a, rope)


def visible(c: LoweringContext, ids: str, mask: str, layer_type: str) -> str:
    """Boolean [B, 1, S, T]: True where query s may attend to key t.

    Query s sits at absolute index T - S + s::

        key t ─> [1, T] ─┐
        query ─> [S, 1] ─┴─> t <= q  (And t > q - window) ─> And(mask [B, 1, 1, T]) ─> [B, 1, S, T]
    """
    g = c.g
    S = g.shape(ids, 1, 2)
    T = g.shape(mask, 1, 2)
    kpos = g.op("Range", [g.const(0), g.op("Squeeze", [T]), g.const(1)])
    qpos = g.op("Range", [g.op("Squeeze", [g.sub(T, S)]), g.op("Squeeze", [T]), g.const(1)])
    k_row, q_col = g.unsqueeze(kpos, [0]), g.unsqueeze(qpos, [1])
    allowed = g.op("LessOrEqual", [k_row, q_col])  # [S, T]
    window = c.dims.sliding_window if layer_type == "sliding_attention" else None
    if window:
        allowed = g.op("And", [allowed, g.op("Greater", [k_row, g.sub(q_col, g.const(window))])])
    pad = g.unsqueeze(g.cast(mask, TensorProto.BOOL), [1, 2])  # [B, 1, 1, T]
    return g.op("And", [allowed, pad])  # [B, 1, S, T]


def row_lengths(c: LoweringContext) -> str:
    """Tokens per row (float [B]): ReduceSum of the mask, built once per graph (static KV)."""
    g = c.g
    return c.once("row_lengths", lambda: g.reduce_sum(g.cast(mf.ATTENTION_MASK, TensorProto.FLOAT), [1], keepdims=0))


# --- masked: MatMul, Where, Softmax, MatMul ---------------------------------------------------
def _masked_inputs(c: LoweringContext, ids: str, mask: str, layer_type: str) -> AttentionInputs:
    rep = c.dims.num_heads // c.dims.num_kv_heads
    allowed = visible(c, ids, mask, layer_type)
    return AttentionInputs(mask=allowed if rep == 1 else c.g.op("Tile", [allowed, c.g.const([1, 1, rep, 1])]))


def _heads(c: LoweringContext, x: str, n: int) -> str:
    """[B, S, n·D] -> [B, n, S, D]"""
    return c.g.transpose(c.g.reshape(x, [0, 0, n, c.dims.head_dim]), [0, 2, 1, 3])


def _masked(c: LoweringContext, i: int, q: str, k: str, v: str, past: tuple, a: AttentionInputs,
            rope: RopeTables | None) -> tuple[str, str, str]:
    g, d = c.g, c.dims
    q, k, v = _heads(c, q, d.num_heads), _heads(c, k, d.num_kv_heads), _heads(c, v, d.num_kv_heads)
    if rope is not None:
        q, k = rotary.rotate(c, q, rope), rotary.rotate(c, k, rope)
    # The concatenations are the present outputs themselves (no Identity copy of the cache).
    k_name, v_name = mf.present_names(i)
    k = g.op("Concat", [past[0], k], name=k_name, axis=2)
    v = g.op("Concat", [past[1], v], name=v_name, axis=2)
    return softmax_attention(c, q, k, v, a.mask), k, v


def softmax_attention(c: LoweringContext, q: str, k: str, v: str, allowed: str) -> str:
    """Grouped-query attention without repeating K/V: q [B, H, S, D] -> [B, KVH, rep·S, D] (the
    rep query heads of a KV head side by side), scores [B, KVH, rep·S, T] against k [B, KVH, T, D];
    masked scores get float32's min (Where, not Add, so fully masked padding rows stay finite)."""
    g, d = c.g, c.dims
    H, KVH, D = d.num_heads, d.num_kv_heads, d.head_dim
    qg = g.reshape(q, [0, KVH, -1, D])
    scores = g.mul(g.matmul(qg, g.transpose(k, [0, 1, 3, 2])), g.const(c.layout.attn_scale, c.dtype))
    if c.dtype != np.float32:
        scores = g.cast(scores, TensorProto.FLOAT)
    scores = g.where(allowed, scores, g.const(np.finfo(np.float32).min, np.float32))
    probs = g.softmax(scores, axis=-1)
    if c.dtype != np.float32:
        probs = g.cast(probs, c.kv_type)
    out = g.reshape(g.matmul(probs, v), [0, H, -1, D])
    return g.reshape(g.transpose(out, [0, 2, 1, 3]), [0, 0, H * D])


# --- gqa: GroupQueryAttention with the visibility as an additive bias ---------------------------
def _gqa_inputs(c: LoweringContext, ids: str, mask: str, layer_type: str) -> AttentionInputs:
    #  every row is told it holds T keys (seqlens_k = T - 1): the bias hides padding and the future
    g = c.g
    bias = g.where(visible(c, ids, mask, layer_type), g.const(0.0, c.dtype), g.const(_HIDDEN[c.dtype], c.dtype))
    total = g.cast(g.op("Squeeze", [g.shape(mask, 1, 2)]), I32)
    seqlens = g.op("Expand", [g.sub(total, g.const(1, np.int32)), g.shape(ids, 0, 1)])
    return AttentionInputs(mask=bias, seqlens=seqlens, total=total)


def _gqa(c: LoweringContext, i: int, q: str, k: str, v: str, past: tuple, a: AttentionInputs,
         rope: RopeTables | None) -> tuple[str, str, str]:
    d = c.dims
    if rope is not None:
        q, k = rotary.rotate(c, q, rope), rotary.rotate(c, k, rope)  # [B, S, n·D]
    out, k, v = c.g.op(
        "GroupQueryAttention", [q, k, v, past[0], past[1], a.seqlens, a.total, "", "", "", a.mask],
        n_out=3, name=[None, *mf.present_names(i)], domain=MS, num_heads=d.num_heads,
        kv_num_heads=d.num_kv_heads, scale=float(c.layout.attn_scale))
    return out, k, v


# --- gqa_static: GroupQueryAttention on fixed buffers, rotary inside ----------------------------
def _static_inputs(c: LoweringContext, ids: str, mask: str, layer_type: str) -> AttentionInputs:
    #  No shape arithmetic: every node stays on the provider (CUDA graphs need that).
    g = c.g
    total = c.once("total", lambda: g.input(mf.TOTAL_SEQUENCE_LENGTH, I32, []))
    seqlens = g.cast(g.sub(row_lengths(c), g.const(1.0, np.float32)), I32)
    return AttentionInputs(seqlens=seqlens, total=total)


def _gqa_static(c: LoweringContext, i: int, q: str, k: str, v: str, past: tuple, a: AttentionInputs,
                rope: RopeTables | None) -> tuple[str, str, str]:
    d = c.dims
    out, k, v = c.g.op(
        "GroupQueryAttention", [q, k, v, past[0], past[1], a.seqlens, a.total, rope.cos, rope.sin],
        n_out=3, name=[None, *mf.present_names(i)], domain=MS, num_heads=d.num_heads,
        kv_num_heads=d.num_kv_heads, scale=float(c.layout.attn_scale), do_rotary=1, rotary_interleaved=0)
    return out, k, v


def static_fits(layout) -> bool:
    """Whether the static form applies: rotary models whose tables fit the cache, without
    sliding-window layers."""
    return (layout.positions == "rope" and rotary.cache_fits(layout)
            and set(layout.dims.layer_types) == {"full_attention"})


# spec.attention -> (inputs, attend); the paged forms are paged.py's
FORMS = {"masked": (_masked_inputs, _masked), "gqa": (_gqa_inputs, _gqa), "gqa_static": (_static_inputs, _gqa_static),
         **paged.FORMS}

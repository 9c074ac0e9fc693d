"""Linear layers: one matmul in the weight's stored form, and the projections of one input.

One weight, by the graph's ``WeightForm`` and the width asked for::

    float        MatMul(x, Wᵀ)                                     (bits None)
    portable     MatMul(x, DequantizeLinear(q, scale, zero))  (+ blocksum(x) @ offset)
    MatMulNBits  MatMulNBits(x, B, scale (, zp); accuracy_level)   (com.microsoft; nbits_accuracy set)

Several weights of one input (``spec.projections``)::

    separate   q = x·Wqᵀ, k = x·Wkᵀ, v = x·Wvᵀ                      (gate/up alike)
    stacked    Split(x·[Wq; Wk; Wv]ᵀ)                              where the parts' storage formats agree
    packed     x·[Wq; Wk; Wv]ᵀ unsplit: GroupQueryAttention splits it (static form; not with q/k norms)

A checkpoint that stores q/k/v or gate/up stacked already (Phi-3) is one matmul in every form.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import norm

if TYPE_CHECKING:
    from ..weights import WeightStore
    from .context import LoweringContext


def project(w: WeightStore, x: str, name: str, *, bits: int | None, accuracy: int | None = None,
            bias: str | None = None, fit_table: bool = False) -> str:
    """y = x @ Wᵀ (+ b) for the source weight ``name`` [out, in] at ``bits`` (None: float).

    ``accuracy``: MatMulNBits' accuracy level (default: the layers'); ``fit_table``: see
    ``WeightStore.nbits``."""
    if w.form.nbits_accuracy is not None and bits is not None:
        y = w.ops.nbits_matmul(x, w.nbits(name, bits, fit_table), accuracy or w.form.nbits_accuracy)
    else:
        y = w.ops.dequant_matmul(x, w.blocks(name, bits), offsets_in_weight=w.form.offsets_in_weight)
    if bias is not None:
        y = w.g.add(y, w.vector(bias))
    return y


def linear(w: WeightStore, x: str, name: str, bias: str | None = None) -> str:
    """A layer's linear at the package precision."""
    return project(w, x, name, bits=w.form.layer_bits, bias=bias)


def qkv(c: LoweringContext, x: str, i: int) -> tuple[str, str, str]:
    """q [B, S, H·D], k and v [B, S, KVH·D] (q/k normed per head where the model does), or, in the
    packed form, (q/k/v in one tensor, "", "")."""
    g, d, L = c.g, c.dims, c.layout
    H, KVH, D = d.num_heads, d.num_kv_heads, d.head_dim
    sizes = [H * D, KVH * D, KVH * D]
    if c.name("qkv", i):
        both = linear(c.w, x, c.req("qkv", i), c.name("qkv_bias", i))
    else:
        both = None if c.spec.projections == "separate" else _stacked(c, x, i, ("q", "k", "v"))
    if both is not None and c.spec.projections == "packed" and not L.qk_norm:
        return both, "", ""
    if both is not None:
        q, k, v = g.split(both, sizes, axis=-1)
    else:
        q, k, v = (linear(c.w, x, c.req(r, i), c.name(r + "_bias", i)) for r in ("q", "k", "v"))
    if L.qk_norm:
        q = g.reshape(norm.norm(c, g.reshape(q, [0, 0, H, D]), "q_norm", i), [0, 0, H * D])
        k = g.reshape(norm.norm(c, g.reshape(k, [0, 0, KVH, D]), "k_norm", i), [0, 0, KVH * D])
    return q, k, v


def mlp(c: LoweringContext, x: str, i: int) -> str:
    """down(act(gate(x)) · up(x)), or down(act(up(x))) for ungated models."""
    g, I = c.g, c.dims.intermediate_size
    if not c.layout.gated_mlp:
        up = linear(c.w, x, c.req("up", i), c.name("up_bias", i))
        return linear(c.w, _act(c, up), c.req("down", i), c.name("down_bias", i))
    if c.name("gate_up", i):
        gate, up = g.split(linear(c.w, x, c.req("gate_up", i)), [I, I], axis=-1)
    else:
        both = None if c.spec.projections == "separate" else _stacked(c, x, i, ("gate", "up"))
        if both is not None:
            gate, up = g.split(both, [I, I], axis=-1)
        else:
            gate, up = (linear(c.w, x, c.req(r, i), c.name(r + "_bias", i)) for r in ("gate", "up"))
    return linear(c.w, g.mul(_act(c, gate), up), c.req("down", i), c.name("down_bias", i))


def _stacked(c: LoweringContext, x: str, i: int, roles: tuple) -> str | None:
    """One matmul over the row-stacked weights of ``roles`` (same input), or None when their
    storage formats (or biases) differ."""
    names = [c.req(r, i) for r in roles]
    biases = [c.name(r + "_bias", i) for r in roles]
    if any(biases) and not all(biases):
        return None
    key = c.w.stack(names, f"{names[0]}+stacked")
    if key is None:
        return None
    bias = c.w.stack(biases, f"{biases[0]}+stacked") if all(biases) else None
    return linear(c.w, x, key, bias)


def _act(c: LoweringContext, x: str) -> str:
    g = c.g
    if c.layout.activation == "silu":
        return g.mul(x, g.sigmoid(x))
    approximate = "tanh" if c.layout.activation == "gelu_tanh" else "none"
    return g.op("Gelu", [x], approximate=approximate)


PROJECTIONS = ("separate", "stacked", "packed")

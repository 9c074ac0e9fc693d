"""Norms (RMSNorm or LayerNorm), alone or right after a residual add, in two forms.

``portable`` (standard ONNX ops; RMSNorm in float32, as transformers computes it)::

    x ─> (Cast f32) ─> Mul(x, x) ─> ReduceMean(-1) ─> Add(eps) ─> Sqrt ─> Div(x, ·) ─> Mul(w) ─> (Cast)
    LayerNorm:  LayerNormalization(x, w (, b))
    add + norm: h + delta ─> Add ─> norm              returns (norm(h + delta), h + delta)

``fused`` (com.microsoft kernels of ONNX Runtime's CPU and CUDA providers)::

    RMSNorm:    SimplifiedLayerNormalization(x, w)              (float32 inside: stash_type 1)
    add + norm: SkipSimplifiedLayerNormalization(h, delta, w) ─> outputs 0 (norm) and 3 (h + delta)
                SkipLayerNormalization(h, delta, w (, b))        for LayerNorm models
    LayerNorm alone keeps the portable op.

Gemma's ``(1 + w)`` is folded into the stored weight (``norm_offset``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

if TYPE_CHECKING:
    from .context import LoweringContext

MS = "com.microsoft"


def norm(c: LoweringContext, x: str, role: str, i: int | None = None) -> str:
    """The norm of ``role`` (layer ``i``) over the last axis of ``x``."""
    return FORMS[c.spec.norm][0](c, x, role, i)


def add_norm(c: LoweringContext, h: str, delta: str | None, role: str, i: int | None = None) -> tuple[str, str]:
    """(norm(h + delta), h + delta): the residual add and the norm that follows it (no add when
    ``delta`` is None)."""
    return FORMS[c.spec.norm][1](c, h, delta, role, i)


def _norm_portable(c: LoweringContext, x: str, role: str, i: int | None) -> str:
    g, L = c.g, c.layout
    w_name = c.req(role, i)
    if L.norm == "layer":
        bias = c.name(role + "_bias", i)
        inputs = [x, c.w.vector(w_name)] + ([c.w.vector(bias)] if bias else [])
        return g.op("LayerNormalization", inputs, axis=-1, epsilon=float(L.norm_eps))
    xf = x if c.dtype == np.float32 else g.cast(x, TensorProto.FLOAT)
    ms = g.reduce_mean(g.mul(xf, xf), [-1])
    y = g.div(xf, g.sqrt(g.add(ms, g.const(L.norm_eps, np.float32))))
    y = g.mul(y, c.w.vector(w_name, np.float32, add=L.norm_offset))
    return y if c.dtype == np.float32 else g.cast(y, c.kv_type)


def _add_norm_portable(c: LoweringContext, h: str, delta: str | None, role: str, i: int | None) -> tuple[str, str]:
    if delta is not None:
        h = c.g.add(h, delta)
    return _norm_portable(c, h, role, i), h


def _norm_fused(c: LoweringContext, x: str, role: str, i: int | None) -> str:
    L = c.layout
    if L.norm == "layer":
        return _norm_portable(c, x, role, i)
    gamma = c.w.vector(c.req(role, i), add=L.norm_offset)
    return c.g.op("SimplifiedLayerNormalization", [x, gamma], axis=-1, epsilon=float(L.norm_eps), stash_type=1)


def _add_norm_fused(c: LoweringContext, h: str, delta: str | None, role: str, i: int | None) -> tuple[str, str]:
    if delta is None:
        return _norm_fused(c, h, role, i), h
    g, L = c.g, c.layout
    gamma = c.w.vector(c.req(role, i), add=L.norm_offset)
    outs = [None, "", "", None]  # the norm and h + delta; the mean and inverse deviation are not computed
    if L.norm == "layer":
        bias = c.name(role + "_bias", i)
        out = g.op("SkipLayerNormalization", [h, delta, gamma] + ([c.w.vector(bias)] if bias else []),
                   n_out=4, name=outs, domain=MS, epsilon=float(L.norm_eps))
    else:
        out = g.op("SkipSimplifiedLayerNormalization", [h, delta, gamma], n_out=4, name=outs, domain=MS,
                   epsilon=float(L.norm_eps))
    return out[0], out[3]


# spec.norm -> (norm, add_norm)
FORMS = {"portable": (_norm_portable, _add_norm_portable), "fused": (_norm_fused, _add_norm_fused)}

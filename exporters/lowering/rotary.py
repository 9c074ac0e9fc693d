"""Rotary position embedding: the cos/sin tables of a layer type and their application, in two forms.

``computed`` (standard ONNX ops, any rotary width)::

    position_ids [B, S] ─> Cast f32 ─> ⊗ inv_freq ─> Concat(f, f) ─> Unsqueeze(1) ─> Cos, Sin  [B, 1, S, rd]
    x [B, H, S, D] ─> Split(rd | rest) ─> x·cos + rotate_half(x)·sin ─> Concat(·, rest)
                      rotate_half(x) = Concat(-x2, x1)        (x1, x2 = the two halves of x)

``cached`` (tables of every position as initializers [max_context, rd / 2])::

    RotaryEmbedding(x [B, S, n·D], position_ids, cos, sin)     (com.microsoft; the static
                                                               variant's GroupQueryAttention reads
                                                               the same tables: do_rotary)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

if TYPE_CHECKING:
    from ..architectures.common import DecoderLayout
    from .context import LoweringContext

MS = "com.microsoft"
MAX_CACHE_BYTES = 64 << 20  # the cached tables' size limit (float32 cos + sin of every position)


@dataclass(frozen=True)
class RopeTables:
    cos: str
    sin: str
    positions: str | None = None  # cached: the position_ids the tables are indexed with (static: none)


def cache_fits(layout: DecoderLayout) -> bool:
    """Whether the cached form applies: full rotary (RotaryEmbedding needs num_heads for partial
    rotary, which differs between q and k under GQA, and num_heads=0 fails when the session
    starts) with tables of every position within MAX_CACHE_BYTES."""
    d = layout.dims
    return layout.rotary_dim == d.head_dim and d.max_context * layout.rotary_dim * 4 <= MAX_CACHE_BYTES


def tables(c: LoweringContext, pos: str | None, layer_type: str) -> RopeTables:
    """The cos/sin tables of ``layer_type``'s frequencies for ``position_ids`` ``pos``."""
    return FORMS[c.spec.rotary][0](c, pos, layer_type)


def rotate(c: LoweringContext, x: str, t: RopeTables) -> str:
    """``x`` rotated: [B, H, S, D] in the computed form, [B, S, n·D] in the cached one."""
    return FORMS[c.spec.rotary][1](c, x, t)


def _computed_tables(c: LoweringContext, pos: str, layer_type: str) -> RopeTables:
    g = c.g
    freqs = g.mul(g.unsqueeze(g.cast(pos, TensorProto.FLOAT), [-1]),
                  g.const(c.layout.inv_freq[layer_type], np.float32))
    emb = g.unsqueeze(g.concat([freqs, freqs], axis=-1), [1])
    cos, sin = g.op("Cos", [emb]), g.op("Sin", [emb])
    if c.dtype != np.float32:
        cos, sin = g.cast(cos, c.kv_type), g.cast(sin, c.kv_type)
    return RopeTables(cos, sin)


def _computed(c: LoweringContext, x: str, t: RopeTables) -> str:
    g = c.g
    rd, D = c.layout.rotary_dim, c.dims.head_dim
    rot, rest = (x, None) if rd == D else g.split(x, [rd, D - rd], axis=-1)
    x1, x2 = g.split(rot, [rd // 2, rd // 2], axis=-1)
    rotated = g.concat([g.neg(x2), x1], axis=-1)
    out = g.add(g.mul(rot, t.cos), g.mul(rotated, t.sin))
    return out if rest is None else g.concat([out, rest], axis=-1)


def _cached_tables(c: LoweringContext, pos: str | None, layer_type: str) -> RopeTables:
    freqs = np.outer(np.arange(c.dims.max_context, dtype=np.float32), c.layout.inv_freq[layer_type])
    cos = c.g.weight(f"rope.{layer_type}.cos", np.cos(freqs).astype(c.dtype))
    sin = c.g.weight(f"rope.{layer_type}.sin", np.sin(freqs).astype(c.dtype))
    return RopeTables(cos, sin, pos)


def _cached(c: LoweringContext, x: str, t: RopeTables) -> str:
    return c.g.op("RotaryEmbedding", [x, t.positions, t.cos, t.sin], domain=MS, interleaved=0)


# spec.rotary -> (tables, rotate)
FORMS = {"computed": (_computed_tables, _computed), "cached": (_cached_tables, _cached)}

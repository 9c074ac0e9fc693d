"""The head: which positions get logits, the final norm, the lm_head in its form, the soft cap::

    h, delta ─> positions ─> add_norm(final_norm) ─> lm_head ─> (Cast f32) ─> (tanh(x/cap)·cap) ─> logits

``spec.logits``, the positions::

    all        every position [B, S, E] (teacher forcing, verification)
    last       Slice(-1) ─> [B, 1, E]
    row_last   each row's last real new token, min(n_b, S) - 1 (static KV: prefill rows are padded
               on the right), S counted on the device: GatherND per row ─> [B, 1, E]
    seq_last   paged KV: the tokens ``logits_index`` names, one per sequence ─> [N, 1, E]

``spec.head``, the lm_head (``HEAD_FORMS``)::

    fp32        a float MatMul
    int8        the 8-bit table (MatMulNBits at the head's accuracy, or DequantizeLinear + MatMul)
    int8-top16  int8 with int8 activations, then its 16 best candidates recomputed in float
    int4        the table fitted to 4 bits, whatever the source's width
    int4-top256 int4 with int8 activations, then its 256 best candidates recomputed in float from the
                8-bit table (the one the tied embedding gathers its rows from: no second copy)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

from portable_infer.package import manifest as mf

from . import linear, norm
from .attention import row_lengths

if TYPE_CHECKING:
    from .context import LoweringContext

HEAD_FORMS = ("int4-top256", "int8-top16", "int8", "int4", "fp32")
# form -> candidates whose logits it recomputes in float from the 8-bit table (refine_top): int8
# activations flip near-ties (16 restore the greedy picks); a 4-bit table also moves the softmax's
# mass (SmolLM2's perplexity: +2.2 % refining 16, +1.1 % 64, -0.02 % 256; docs/benchmarks.md)
REFINE_TOP = {"int8-top16": 16, "int4-top256": 256}
# spec.logits -> the logits output's position dimension
POSITION_DIM = {"all": "sequence", "last": 1, "row_last": 1, "seq_last": 1}


def logits(c: LoweringContext, h: str, delta: str) -> str:
    """Float32 logits from the last block's residual ``h`` and output ``delta``."""
    g, L = c.g, c.layout
    h, delta = _POSITIONS[c.spec.logits](c, h, delta)
    h, _ = norm.add_norm(c, h, delta, "final_norm")
    out = lm_head(c, h)
    if c.dtype != np.float32:
        out = g.cast(out, TensorProto.FLOAT)
    if L.final_logit_softcap:
        cap = g.const(L.final_logit_softcap, np.float32)
        out = g.mul(g.tanh(g.div(out, cap)), cap)
    return out


def lm_head_name(c: LoweringContext) -> str:
    lm = c.name("lm_head")
    return c.req("embed") if c.dims.tie_word_embeddings or lm is None else lm


def lm_head(c: LoweringContext, h: str) -> str:
    name, form, acc = lm_head_name(c), c.spec.head, c.w.form.table_accuracy
    if form == "fp32":
        return linear.project(c.w, h, name, bits=None, accuracy=acc)
    if form in ("int4", "int4-top256"):
        out = linear.project(c.w, h, name, bits=4, accuracy=acc, fit_table=True)
    else:
        out = linear.project(c.w, h, name, bits=c.w.form.table_bits, accuracy=acc)
    k = min(REFINE_TOP.get(form, 0), c.dims.vocab_size)
    return refine_top(c, h, out, name, k) if k else out


def refine_top(c: LoweringContext, x: str, logits: str, name: str, k: int) -> str:
    """Float logits for the k best candidates of a head computed with int8 activations (or a 4-bit
    table), recomputed from the 8-bit table, so greedy picks match float arithmetic over that table
    (near-ties flip otherwise) for k table rows' work::

        logits --TopK--> idx [B, 1, k] --table rows--> [B, k, E] --x·rowsᵀ--> [B, 1, k]
        ScatterElements(logits, idx, exact)
    """
    g = c.g
    _, idx = g.op("TopK", [logits, g.const([k])], n_out=2, axis=-1)
    ids = g.op("Squeeze", [idx, g.const([1])])
    rows = c.w.ops.nbits_rows(ids, c.w.nbits(name, 8))
    exact = g.matmul(x, g.transpose(rows, [0, 2, 1]))
    return g.op("ScatterElements", [logits, idx, exact], axis=-1)


def _all(c: LoweringContext, h: str, delta: str) -> tuple[str, str]:
    return h, delta


def _last(c: LoweringContext, h: str, delta: str) -> tuple[str, str]:
    last = lambda t: c.g.slice(t, [-1], [np.iinfo(np.int64).max], [1])  # noqa: E731  [B, 1, E]
    return last(h), last(delta)


def _row_last(c: LoweringContext, h: str, delta: str) -> tuple[str, str]:
    #  n [B] (mask sums) ───────┐
    #  S = ReduceSum(ids >= 0) ─┴─> Min ─> - 1 ─> int64 idx [B, 1]
    #  t [B, S, E] ─> GatherND(t, idx, batch_dims 1) ─> Unsqueeze ─> [B, 1, E]
    g = c.g
    n = row_lengths(c)
    ones = g.cast(g.op("GreaterOrEqual", [mf.INPUT_IDS, g.const(0)]), TensorProto.FLOAT)
    s = g.reduce_sum(ones, [1], keepdims=0)
    idx = g.unsqueeze(g.cast(g.sub(g.op("Min", [n, s]), g.const(1.0, np.float32)), TensorProto.INT64), [1])
    pick = lambda t: g.unsqueeze(g.op("GatherND", [t, idx], batch_dims=1), [1])  # noqa: E731
    return pick(h), pick(delta)


def _seq_last(c: LoweringContext, h: str, delta: str) -> tuple[str, str]:
    #  paged: t [1, T, E] ─> Gather(axis 1, logits_index [N]) ─> [1, N, E] ─> Transpose ─> [N, 1, E]
    g = c.g
    pick = lambda t: g.transpose(g.gather(t, mf.LOGITS_INDEX, axis=1), [1, 0, 2])  # noqa: E731
    return pick(h), pick(delta)


_POSITIONS = {"all": _all, "last": _last, "row_last": _row_last, "seq_last": _seq_last}

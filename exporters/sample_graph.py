"""``sample.onnx``: sampled picks where the logits are, the host sampler's rule in graph ops.

The runtime draws a temperature / top-k / top-p / min-p row on the device with this graph: only
the row's uniform number goes up and its token id comes back, where the host draw brings a
vocabulary of logits to the host (a 128,256-token row costs 0.2-1.9 ms to sample in numpy).
The rule is :func:`portable_infer.decode.sampling.make_sampler`'s, step for step::

    x     = Gather(logits, rows) / temperature                  [n, V]  (the host's `tempered`)
    m     = max(x); bad: sum(x) is NaN or m is +-inf             [n]     status 2: the host raises
    w     = exp(x - m)                                           [n, V]  softmax's weights
    top_k: keep x >= the k-th largest (ties kept)                        TopK(x, K) gives it
    top_p: keep the first n_keep of TopK's order (value, then index) with
           n_keep = #{cdf < top_p} + 1, cdf over the kept weights in that order (float64)
    min_p: keep x >= m + log(min_p)
    token = inverse CDF of the kept weights in vocabulary order, with the row's one uniform
            number, in two levels (blocks of 256, then a token), sums in float64

The draw is ``draw_weighted``'s to the float rounding of the sums: for the same uniform number
the same token, bar a number landing within rounding of a boundary. ``K`` (an input) is how many
tokens TopK sorts: the host passes 1 when no row filters by rank, else 1024; a row whose kept set
reaches past the K best (top_k > K, or top_p's mass not within them) gets status 1 and is run
again with K = V, the whole vocabulary sorted. A row's token does not depend on the other rows
or on K. Cumulative sums run in blocks of 256: ONNX Runtime's CUDA CumSum sums each output's
prefix on its own thread (quadratic in the axis).

Only ops the CUDA execution provider implements; nothing depends on the vocabulary size.
"""

from __future__ import annotations

import numpy as np
from typing import NamedTuple

from onnx import TensorProto, helper, numpy_helper

BLOCK = 256  # tokens a draw's first level sums (decode/draw.py's _DRAW_BLOCK)
F32, F64, I64, BOOL = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL


class _Graph:
    """Nodes and constants, each output named once; the constants every part uses."""

    def __init__(self):
        self.nodes, self.consts, self._n = [], [], 0
        self.axis_1, self.axis_2, self.one = self.const([1], np.int64), self.const([2], np.int64), self.const([1], np.int64)
        self.minus_inf, self.zero_f = self.const(-np.inf, np.float32), self.const(0.0, np.float32)

    def const(self, value, dtype) -> str:
        name = f"c{len(self.consts)}"
        self.consts.append(numpy_helper.from_array(np.array(value, dtype), name))
        return name

    def op(self, kind: str, *inputs, outputs: int = 1, **attrs):
        self._n += 1
        names = [f"{kind.lower()}{self._n}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(kind, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def col(self, name: str) -> str:
        """An input [n] as a column [n, 1]."""
        return self.op("Unsqueeze", name, self.axis_1)


def _count(g: _Graph, flags: str) -> str:
    """How many of ``flags`` [n, L] (bool) are set in each row: [n, 1] int64, summed in float32
    (exact to 2^24; ONNX Runtime's CUDA reductions of int64 run a thread per output)."""
    return g.op("Cast", g.op("ReduceSum", g.op("Cast", flags, to=F32), g.axis_1, keepdims=1), to=I64)


def _blocks(g: _Graph, x: str) -> str:
    """``x`` [n, L] as [n, ceil(L / BLOCK), BLOCK], padded with zeros."""
    length, block = g.op("Shape", x, start=1, end=2), g.const([BLOCK], np.int64)
    pad = g.op("Mod", g.op("Sub", block, g.op("Mod", length, block)), block)
    padded = g.op("Pad", x, g.op("Concat", g.const([0, 0, 0], np.int64), pad, axis=0), mode="constant")
    return g.op("Reshape", padded, g.const([0, -1, BLOCK], np.int64))


def _blocked_cumsum(g: _Graph, x: str) -> str:
    """CumSum of ``x`` [n, L] along its last axis in blocks of BLOCK: each block's own sums, then
    the blocks' totals before it added (L padded with zeros, then cut back)."""
    inner = g.op("CumSum", _blocks(g, x), g.axis_2)
    last = g.op("Slice", inner, g.const([BLOCK - 1], np.int64), g.const([BLOCK], np.int64), g.axis_2)
    before = g.op("CumSum", last, g.axis_1, exclusive=1)  # [n, L/B, 1]
    flat = g.op("Reshape", g.op("Add", inner, before), g.const([0, -1], np.int64))
    return g.op("Slice", flat, g.const([0], np.int64), g.op("Shape", x, start=1, end=2), g.axis_1)


def _first_above(g: _Graph, cdf: str, weights: str, target: str) -> str:
    """``draw.py``'s ``_pick`` per row: the index ``i`` with ``cdf[i-1] <= target < cdf[i]``,
    or the last index of non-zero weight where that one is past the end or of zero weight
    (the target rounded up). ``cdf``/``weights`` [n, L], ``target`` [n, 1] -> [n, 1] int64."""
    count = _count(g, g.op("LessOrEqual", cdf, target))
    length = g.op("Shape", weights, start=1, end=2)
    positions = g.op("Range", g.const(0.0, np.float32), g.op("Cast", g.op("Squeeze", length), to=F32),
                     g.const(1.0, np.float32))
    nonzero = g.op("Greater", weights, g.const(0.0, np.float64))
    last = g.op("Cast", g.op("ReduceMax", g.op("Where", nonzero, positions, g.const(-1.0, np.float32)), g.axis_1,
                             keepdims=1), to=I64)
    inside = g.op("Min", count, g.op("Sub", length, g.one))
    ok = g.op("And", g.op("Less", count, length),
              g.op("Greater", g.op("GatherElements", weights, inside, axis=1), g.const(0.0, np.float64)))
    return g.op("Where", ok, count, last)


class _Ranked(NamedTuple):
    """TopK's sorted tokens and top-k's cut (tensor names)."""

    values: str  # [n, K] the K largest tempered logits, best first (ties: lower index first)
    index: str  # [n, K] their token ids
    width: str  # [1] K
    floor: str  # [n, 1] the k-th largest value (-inf: top-k off)
    short: str  # [n, 1] k reaches past the K sorted tokens
    keep: str  # [n, V] x >= floor


def _top_k(g: _Graph, x: str, vocab: str) -> _Ranked:
    """The k-th largest value of each row (TopK of ``k`` tokens), every token at or above it kept."""
    values, index = g.op("TopK", x, "k", axis=1, largest=1, sorted=1, outputs=2)
    width, k = g.op("Shape", values, start=1, end=2), g.col("top_k")
    k_on = g.op("And", g.op("Greater", k, g.const(0, np.int64)), g.op("Less", k, vocab))
    kth = g.op("GatherElements", values, g.op("Sub", g.op("Min", g.op("Max", k, g.one), width), g.one), axis=1)
    floor = g.op("Where", k_on, kth, g.minus_inf)
    return _Ranked(values, index, width, floor, g.op("And", k_on, g.op("Greater", k, width)),
                   g.op("GreaterOrEqual", x, floor))


def _top_p(g: _Graph, x: str, weights: str, top0: str, ranked: _Ranked) -> tuple:
    """The smallest run of TopK's order whose weight reaches top_p of the mass top-k kept:
    ``(keep, short)``; ``short``: that run reaches past the sorted tokens."""
    values, index, width, floor, _, keep_k = ranked
    p = g.col("top_p")
    p_on = g.op("Less", p, g.const(1.0, np.float64))
    candidates = g.op("And", keep_k, g.op("Greater", x, g.minus_inf))
    total = g.op("ReduceSum", g.op("Cast", g.op("Where", candidates, weights, g.zero_f), to=F64), g.axis_1,
                 keepdims=1)
    n_cand = _count(g, candidates)
    sorted_on = g.op("And", g.op("GreaterOrEqual", values, floor), g.op("Greater", values, g.minus_inf))
    sorted_w = g.op("Cast", g.op("Where", sorted_on, g.op("Exp", g.op("Sub", values, top0)), g.zero_f), to=F64)
    cdf = g.op("Div", _blocked_cumsum(g, sorted_w), total)  # float64, as the host sums
    below = _count(g, g.op("Less", cdf, p))
    n_keep = g.op("Min", g.op("Add", below, g.one), n_cand)
    covered = g.op("Or", g.op("Less", below, width), g.op("LessOrEqual", n_cand, width))
    ranks = g.op("Range", g.const(0, np.int64), g.op("Squeeze", width), g.const(1, np.int64))
    kept_sorted = g.op("Cast", g.op("Less", ranks, n_keep), to=F32)
    scattered = g.op("ScatterElements", g.op("ConstantOfShape", g.op("Shape", x)), index, kept_sorted, axis=1)
    keep = g.op("Or", g.op("Not", p_on), g.op("Greater", scattered, g.const(0.5, np.float32)))
    return keep, g.op("And", p_on, g.op("Not", covered))


def _draw(g: _Graph, kept: str) -> str:
    """The inverse CDF of ``kept`` [n, V] (float64 weights) at each row's uniform number, block
    then token (``draw_weighted``): [n, 1] int64."""
    blocks = _blocks(g, kept)  # [n, V/B, B]
    block_w = g.op("ReduceSum", blocks, g.axis_2, keepdims=0)  # [n, V/B]
    block_cdf = g.op("CumSum", block_w, g.axis_1)
    target = g.op("Mul", g.col("u"), g.op("Gather", block_cdf, g.const([-1], np.int64), axis=1))
    block = _first_above(g, block_cdf, block_w, target)  # [n, 1]
    before = g.op("GatherElements", block_cdf, g.op("Max", g.op("Sub", block, g.one), g.const([0], np.int64)), axis=1)
    rest = g.op("Sub", target, g.op("Where", g.op("Greater", block, g.const(0, np.int64)), before,
                                     g.const(0.0, np.float64)))
    pick = g.op("Expand", g.op("Unsqueeze", block, g.axis_2), g.op("Concat", g.op("Shape", block, start=0, end=1),
                                                                   g.const([1, BLOCK], np.int64), axis=0))
    inner = g.op("Reshape", g.op("GatherElements", blocks, pick, axis=1), g.const([0, BLOCK], np.int64))
    offset = _first_above(g, g.op("CumSum", inner, g.axis_1), inner, rest)
    return g.op("Add", g.op("Mul", block, g.const(BLOCK, np.int64)), offset)


def sample_model_graph():
    g = _Graph()
    # tempered logits, their max, and whether they can be sampled at all
    x = g.op("Div", g.op("Gather", "logits", "rows", axis=0), g.col("temperature"))
    # the max by ArgMax: ONNX Runtime's CUDA ReduceMax (cuDNN) took 11.5 ms for [256, 128256] on an H200
    top = g.op("GatherElements", x, g.op("ArgMax", x, axis=1, keepdims=1), axis=1)
    bad = g.op("Or", g.op("IsNaN", g.op("ReduceSum", x, g.axis_1, keepdims=1)), g.op("IsInf", top))
    top0 = g.op("Where", bad, g.zero_f, top)
    weights = g.op("Exp", g.op("Sub", x, top0))

    ranked = _top_k(g, x, g.op("Shape", x, start=1, end=2))
    keep_p, p_short = _top_p(g, x, weights, top0, ranked)
    keep_m = g.op("GreaterOrEqual", x, g.op("Add", top, g.col("log_min_p")))
    keep = g.op("And", g.op("And", ranked.keep, keep_p), keep_m)
    token = _draw(g, g.op("Cast", g.op("Where", keep, weights, g.zero_f), to=F64))
    g.nodes.append(helper.make_node("Squeeze", [token, g.axis_1], ["token"]))
    short = g.op("Cast", g.op("Or", ranked.short, p_short), to=I64)
    status = g.op("Where", bad, g.const(2, np.int64), short)
    g.nodes.append(helper.make_node("Squeeze", [status, g.axis_1], ["status"]))

    n = ["n"]
    return helper.make_graph(
        g.nodes, "sample",
        [helper.make_tensor_value_info("logits", F32, ["batch", "vocab"]),
         helper.make_tensor_value_info("rows", I64, n),
         helper.make_tensor_value_info("temperature", F32, n),
         helper.make_tensor_value_info("top_k", I64, n),
         helper.make_tensor_value_info("top_p", F64, n),
         helper.make_tensor_value_info("log_min_p", F32, n),
         helper.make_tensor_value_info("u", F64, n),
         helper.make_tensor_value_info("k", I64, [1])],
        [helper.make_tensor_value_info("token", I64, n),
         helper.make_tensor_value_info("status", I64, n)], g.consts)


def gather_rows_graph():
    """``rows.onnx``: ``Gather(logits, rows, axis=0)``, the rows the host reads, and no others."""
    return helper.make_graph(
        [helper.make_node("Gather", ["logits", "rows"], ["fetched"], axis=0)], "rows",
        [helper.make_tensor_value_info("logits", F32, ["batch", "vocab"]),
         helper.make_tensor_value_info("rows", I64, ["n"])],
        [helper.make_tensor_value_info("fetched", F32, ["n", "vocab"])])

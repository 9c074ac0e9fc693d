"""lowering/head.py: the logits' positions (all, last, each row's last real token), the final norm,
the lm_head in each form (float, 8-bit, 8-bit with its top 16 refined, 4-bit) and the soft cap,
against numpy. Fresh random inputs each run (``LOWERING_SEED=<seed>`` reruns one)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from _lowering import context, layout, op_types, run
from exporters.lowering import head
from onnx import TensorProto
from exporters.quant import quantize
from portable_infer.package import manifest as mf

E, V = 64, 80
NAMES = {"final_norm": "final.weight", "lm_head": "lm.weight", "embed": "embed.weight"}


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("LOWERING_SEED") or random.SystemRandom().randrange(2**31))
    print(f"LOWERING_SEED={s}")
    return s


def weights(rng) -> dict:
    return {"final.weight": (1 + 0.2 * rng.standard_normal(E)).astype(np.float32),
            "lm.weight": (0.1 * rng.standard_normal((V, E))).astype(np.float32)}


def normed(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    h = h.astype(np.float64)
    return h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-6) * w


@pytest.mark.parametrize("variant,case", [("portable", "prefill"), ("fused", "prefill"), ("fused", "decode"),
                                          ("static", "prefill"), ("static", "decode")])
def test_positions(variant, case, seed):
    """all: every position; last: the last one; row_last (static): row b's min(n_b, S) - 1, where
    a prefill's shorter rows are padded on the right."""
    rng = np.random.default_rng(seed)
    w = weights(rng)
    c = context(layout(names=NAMES), w, variant)
    n = np.array([2, 4]) if case == "prefill" else np.array([3, 6])  # tokens per row so far
    S, T = (4, 4) if case == "prefill" else (1, 8)
    h, d = (rng.standard_normal((2, S, E)).astype(np.float32) for _ in range(2))
    feeds = {"h": h, "d": d, mf.INPUT_IDS: rng.integers(0, V, (2, S)),
             mf.ATTENTION_MASK: (np.arange(T) < n[:, None]).astype(np.int64)}
    if variant != "static":
        del feeds[mf.INPUT_IDS], feeds[mf.ATTENTION_MASK]
    (got,) = run(c.g, feeds, [head.logits(c, "h", "d")])
    every = normed(h + d, w["final.weight"]) @ w["lm.weight"].T
    want = {"portable": every, "fused": every[:, -1:],
            "static": every[np.arange(2), np.minimum(n, S) - 1][:, None]}[variant]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert head.POSITION_DIM[c.spec.logits] == ("sequence" if variant == "portable" else 1)


def test_soft_cap(seed):
    rng = np.random.default_rng(seed)
    w = weights(rng)
    c = context(layout(names=NAMES, final_logit_softcap=2.0), w, "portable")
    h, d = (rng.standard_normal((1, 3, E)).astype(np.float32) for _ in range(2))
    (got,) = run(c.g, {"h": h, "d": d}, [head.logits(c, "h", "d")])
    np.testing.assert_allclose(got, np.tanh(normed(h + d, w["final.weight"]) @ w["lm.weight"].T / 2) * 2,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant,options,form", [
    ("portable", {}, "int8"),  # the 8-bit table, DequantizeLinear + MatMul
    ("fused", {"head_accuracy": 1}, "int8"),  # MatMulNBits, float activations: nothing to refine
    ("fused", {}, "int8-top16"),  # int8 activations, the best 16 recomputed in float
    ("fused", {"activations": "fp16"}, "fp32"),  # GPU packages: a float16 table
])
def test_lm_head_forms(variant, options, form, seed):
    rng = np.random.default_rng(seed)
    w = weights(rng)
    c = context(layout(names=NAMES), w, variant, precision="int4", **options)
    assert c.spec.head == form
    dt = c.dtype
    x = rng.standard_normal((2, 1, E)).astype(dt)
    outputs = [head.lm_head(c, "x")]
    if form == "int8-top16":  # the candidates the graph refines: its TopK's indices (as floats, for run)
        outputs.append(c.g.op("Cast", [next(n.output[1] for n in c.g.nodes if n.op_type == "TopK")], to=1))
    got, *refined = run(c.g, {"x": x}, outputs, dt)
    table = w["lm.weight"] if form == "fp32" else quantize(w["lm.weight"], 8).dequantize()
    want = x.astype(np.float64) @ table.T
    scale = np.abs(want).max()
    if form == "int8-top16":
        # the refined candidates, not got's own top 16: an unrefined int8 logit may rank among those
        # (LOWERING_SEED=200088740 failed on that)
        top = refined[0].astype(np.int64)
        assert top.shape[-1] == head.REFINE_TOP[form]
        np.testing.assert_allclose(np.take_along_axis(got, top, -1), np.take_along_axis(want, top, -1),
                                   rtol=1e-4, atol=1e-4 * scale)
        np.testing.assert_allclose(got, want, atol=3e-2 * scale)  # int8 activations elsewhere
        assert "ScatterElements" in op_types(c.g)
    else:
        np.testing.assert_allclose(got, want, rtol=2e-3 if dt == np.float16 else 1e-4,
                                   atol=(2e-3 if dt == np.float16 else 1e-4) * scale)


def test_int4_head_fits_the_table_to_4_bits(seed, monkeypatch):
    """The -q4 graphs' int4 form: the table at 4 bits in one MatMulNBits, whatever its source's width."""
    from exporters.lowering import spec

    monkeypatch.setattr(spec, "Q4_HEAD", "int4")
    rng = np.random.default_rng(seed)
    w = weights(rng)
    c = context(layout(names=NAMES), w, "fused-q4", precision="int4")
    x = rng.standard_normal((2, 1, E)).astype(np.float32)
    (got,) = run(c.g, {"x": x}, [head.lm_head(c, "x")])
    want = x.astype(np.float64) @ quantize(w["lm.weight"], 4).dequantize().T
    np.testing.assert_allclose(got, want, atol=3e-2 * np.abs(want).max())  # int8 activations
    (node,) = [n for n in c.g.nodes if n.op_type == "MatMulNBits"]
    assert {a.name: a.i for a in node.attribute}["bits"] == 4


@pytest.mark.parametrize("variant,constant,accuracy", [("fused-int8", "INT8_HEAD", 4), ("static-q4", "Q4_HEAD", 4),
                                                       ("fused-int8", "INT8_HEAD", 1)])
def test_int4_top256_head(variant, constant, accuracy, seed, monkeypatch):
    """int4-top256: every logit from the table at 4 bits, then the 256 best recomputed from the 8-bit
    table that the tied embedding gathers its rows from; the graph holds each table once."""
    from exporters.lowering import spec

    monkeypatch.setattr(spec, constant, "int4-top256")
    V = 640  # more rows than it refines
    rng = np.random.default_rng(seed)
    table = (0.1 * rng.standard_normal((V, E))).astype(np.float32)
    c = context(layout(names={"embed": "embed.weight"}, vocab=V), {"embed.weight": table}, variant, precision="int4",
                head_accuracy=accuracy)
    assert c.spec.head == "int4-top256"
    x = rng.standard_normal((2, 1, E)).astype(np.float32)
    ids = rng.integers(0, V, (2, 3))
    rows, got = run(c.g, {"x": x, "ids": ids}, [c.w.embedding("ids", "embed.weight", 8), head.lm_head(c, "x")])
    q8, q4 = quantize(table, 8).dequantize(), quantize(table, 4).dequantize()
    np.testing.assert_allclose(rows, q8[ids], rtol=1e-5, atol=1e-6)
    want8, want4 = x.astype(np.float64) @ q8.T, x.astype(np.float64) @ q4.T
    scale = np.abs(want8).max()
    tol = (1e-4 if accuracy == 1 else 3e-2) * scale  # float or int8 activations
    refined = np.abs(got - want8) <= 1e-4 * scale  # recomputed from the 8-bit table (or equal by chance)
    np.testing.assert_allclose(got[~refined], want4[~refined], atol=tol)  # the rest: the 4-bit table's
    # k of them among the 4-bit logits' best k (up to the activations' rounding)
    k = head.REFINE_TOP["int4-top256"]
    kth = np.sort(want4, -1)[..., -k, None]
    assert ((refined & (want4 >= kth - 2 * tol)).sum(-1) >= k).all()
    if accuracy != 1:
        assert np.abs(got - want4)[~refined].mean() < np.abs(got - want8)[~refined].mean()
    tables = [t for t in c.g.initializers if t.data_type == TensorProto.UINT8 and np.prod(t.dims) >= V * E // 4]
    assert sum(int(np.prod(t.dims)) for t in tables) == V * E // 2 + V * E  # one 4-bit table, one 8-bit

"""lowering/linear.py: one linear in each stored form (float, DequantizeLinear, MatMulNBits; 4 and
8 bits; other block sizes) and the projections of one input (separate, stacked, packed), against
numpy on the weights the graph holds. Fresh random inputs each run (``LOWERING_SEED=<seed>``)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from _lowering import DictSource, context, layout, op_types, run
from exporters.graph import GraphBuilder
from exporters.lowering import linear
from exporters.quant import quantize
from exporters.weights import WeightForm, WeightStore

H, KVH, D, E, I = 4, 2, 16, 64, 96
NAMES = {r: f"{r}.weight" for r in ("q", "k", "v", "gate", "up", "down")} | {"q_bias": "q.bias", "k_bias": "k.bias",
                                                                             "v_bias": "v.bias"}


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("LOWERING_SEED") or random.SystemRandom().randrange(2**31))
    print(f"LOWERING_SEED={s}")
    return s


@pytest.mark.parametrize("form", [
    WeightForm("fp32"),
    WeightForm("int8"), WeightForm("int4"), WeightForm("int4", block=16),  # DequantizeLinear + MatMul
    WeightForm("int8", nbits_accuracy=1), WeightForm("int4", nbits_accuracy=1),  # MatMulNBits
    WeightForm("int4", nbits_accuracy=1, block=64),
], ids=["float", "dq-int8", "dq-int4", "dq-int4-b16", "nbits-int8", "nbits-int4", "nbits-int4-b64"])
def test_one_linear_in_each_form(form, seed):
    rng = np.random.default_rng(seed)
    w = (0.1 * rng.standard_normal((48, 128))).astype(np.float32)
    bias = rng.standard_normal(48).astype(np.float32)
    x = rng.standard_normal((2, 3, 128)).astype(np.float32)
    g = GraphBuilder("linear", None)
    store = WeightStore(g, DictSource({"w": w, "b": bias}), form)
    (y,) = run(g, {"x": x}, [linear.linear(store, "x", "w", "b")])
    held = w if form.layer_bits is None else quantize(w, form.layer_bits, form.block).dequantize()
    np.testing.assert_allclose(y, x @ held.T + bias, rtol=1e-4, atol=1e-4)
    ops = op_types(g)
    want = "MatMul" if form.layer_bits is None else ("MatMulNBits" if form.nbits_accuracy else "DequantizeLinear")
    assert want in ops, ops


@pytest.mark.parametrize("variant,matmuls", [("portable", 3), ("fused", 1), ("static", 1)])
def test_qkv_projections(variant, matmuls, seed):
    """separate (portable), stacked and split (fused), packed for GroupQueryAttention (static)."""
    rng = np.random.default_rng(seed)
    sizes = {"q": H * D, "k": KVH * D, "v": KVH * D}
    tensors = {f"{r}.weight": (0.1 * rng.standard_normal((n, E))).astype(np.float32) for r, n in sizes.items()}
    tensors |= {f"{r}.bias": rng.standard_normal(n).astype(np.float32) for r, n in sizes.items()}
    c = context(layout(names=NAMES), tensors, variant)
    x = rng.standard_normal((2, 3, E)).astype(np.float32)
    q, k, v = linear.qkv(c, "x", 0)
    want = [x @ tensors[f"{r}.weight"].T + tensors[f"{r}.bias"] for r in "qkv"]
    if variant == "static":
        assert (k, v) == ("", "")
        (packed,) = run(c.g, {"x": x}, [q])
        np.testing.assert_allclose(packed, np.concatenate(want, -1), rtol=1e-5, atol=1e-5)
    else:
        for got, ref in zip(run(c.g, {"x": x}, [q, k, v]), want):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert op_types(c.g).count("MatMul") == matmuls
    assert ("Split" in op_types(c.g)) == (variant == "fused")


@pytest.mark.parametrize("variant", ["portable", "fused"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_mlp(variant, activation, seed):
    rng = np.random.default_rng(seed)
    tensors = {"gate.weight": rng.standard_normal((I, E)), "up.weight": rng.standard_normal((I, E)),
               "down.weight": rng.standard_normal((E, I))}
    tensors = {n: (0.1 * w).astype(np.float32) for n, w in tensors.items()}
    c = context(layout(names=NAMES, activation=activation), tensors, variant)
    x = rng.standard_normal((2, 3, E)).astype(np.float32)
    (y,) = run(c.g, {"x": x}, [linear.mlp(c, "x", 0)])
    gate, up = x @ tensors["gate.weight"].T, x @ tensors["up.weight"].T
    if activation == "silu":
        act = gate / (1 + np.exp(-gate))
    else:
        act = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3)))
    np.testing.assert_allclose(y, (act * up) @ tensors["down.weight"].T, rtol=1e-4, atol=1e-4)
    assert op_types(c.g).count("MatMul") == {"portable": 3, "fused": 2}[variant]


def test_mixed_formats_stay_separate(seed):
    """q/k/v whose stored forms differ (one float, two blocks) cannot be stacked: three matmuls."""
    rng = np.random.default_rng(seed)
    tensors = {"q.weight": (0.1 * rng.standard_normal((H * D, E))).astype(np.float32),
               "k.weight": quantize((0.1 * rng.standard_normal((KVH * D, E))).astype(np.float32), 4),
               "v.weight": quantize((0.1 * rng.standard_normal((KVH * D, E))).astype(np.float32), 4)}
    c = context(layout(names=NAMES), tensors, "fused", precision="int4")
    x = rng.standard_normal((1, 2, E)).astype(np.float32)
    got = run(c.g, {"x": x}, list(linear.qkv(c, "x", 0)))
    held = [quantize(tensors["q.weight"], 4).dequantize(), tensors["k.weight"].dequantize(),
            tensors["v.weight"].dequantize()]
    for y, w in zip(got, held):
        np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-4)
    assert op_types(c.g).count("MatMulNBits") == 3 and "Split" not in op_types(c.g)

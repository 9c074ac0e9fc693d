"""lowering/norm.py: RMSNorm and LayerNorm, alone and after the residual add, in the portable and
the fused form, against numpy. Fresh random inputs each run (``LOWERING_SEED=<seed>`` reruns one)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from _lowering import context, layout, op_types, run
from exporters.lowering import norm

NAMES = {"n": "n.weight", "n_bias": "n.bias"}


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("LOWERING_SEED") or random.SystemRandom().randrange(2**31))
    print(f"LOWERING_SEED={s}")
    return s


def reference(x: np.ndarray, kind: str, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    if kind == "rms":
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


@pytest.mark.parametrize("variant", ["portable", "fused"])
@pytest.mark.parametrize("kind,offset", [("rms", 0.0), ("rms", 1.0), ("layer", 0.0)])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_norm_and_add_norm(variant, kind, offset, precision, seed):
    rng = np.random.default_rng(seed)
    w = (offset == 0) + 0.2 * rng.standard_normal(64).astype(np.float32)  # Gemma stores w - 1
    b = 0.2 * rng.standard_normal(64).astype(np.float32)
    tensors = {"n.weight": w} | ({"n.bias": b} if kind == "layer" else {})
    c = context(layout(names=NAMES, norm=kind, norm_eps=1e-5, norm_offset=offset), tensors, variant, precision)
    dt = np.float16 if precision == "fp16" else np.float32
    x, h, d = (rng.standard_normal((2, 3, 64)).astype(dt) for _ in range(3))
    y = norm.norm(c, "x", "n")
    y2, s = norm.add_norm(c, "h", "d", "n")
    y3, h3 = norm.add_norm(c, "x", None, "n")  # the first layer: nothing to add yet
    got = run(c.g, {"x": x, "h": h, "d": d}, [y, y2, s, y3, h3], dt)
    tol = 1e-5 if precision == "fp32" else 2e-2
    gamma, beta = w + offset, (b if kind == "layer" else 0)
    sum_ = h.astype(np.float32) + d.astype(np.float32)
    np.testing.assert_allclose(got[0], reference(x, kind, gamma, beta, 1e-5), rtol=tol, atol=tol)
    np.testing.assert_allclose(got[1], reference(sum_, kind, gamma, beta, 1e-5), rtol=tol, atol=tol)
    np.testing.assert_allclose(got[2], sum_, rtol=tol, atol=tol)
    np.testing.assert_allclose(got[3], got[0])
    np.testing.assert_array_equal(got[4], x)
    ops = op_types(c.g)
    if variant == "fused":
        skip = "SkipSimplifiedLayerNormalization" if kind == "rms" else "SkipLayerNormalization"
        assert skip in ops, ops
        assert "Add" not in ops, ops
        # the mean and inverse deviation (outputs 1 and 2) are left out, so ONNX Runtime skips them
        assert [list(n.output)[1:3] for n in c.g.nodes if n.op_type == skip] == [["", ""]]
    else:
        assert not any(o.startswith(("Skip", "Simplified")) for o in ops), ops

"""lowering/rotary.py: cos/sin tables and the rotation, computed (full and partial rotary) and
cached (RotaryEmbedding), against numpy. Fresh random inputs each run (``LOWERING_SEED=<seed>``)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from _lowering import context, layout, op_types, run
from exporters.lowering import rotary

B, H, S, D = 2, 4, 5, 16


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("LOWERING_SEED") or random.SystemRandom().randrange(2**31))
    print(f"LOWERING_SEED={s}")
    return s


def reference(x: np.ndarray, pos: np.ndarray, inv: np.ndarray, rd: int) -> np.ndarray:
    """x [B, H, S, D] rotated at ``pos`` [B, S] on its first ``rd`` channels (rotate_half)."""
    f = pos[..., None].astype(np.float64) * inv
    emb = np.concatenate([f, f], -1)[:, None]
    r, rest = x[..., :rd].astype(np.float64), x[..., rd:]
    x1, x2 = r[..., : rd // 2], r[..., rd // 2:]
    return np.concatenate([r * np.cos(emb) + np.concatenate([-x2, x1], -1) * np.sin(emb), rest], -1)


@pytest.mark.parametrize("rd", [D, D // 2], ids=["full", "partial"])
def test_computed(rd, seed):
    rng = np.random.default_rng(seed)
    lay = layout(rotary_dim=rd)
    c = context(lay, {}, "portable")
    x = rng.standard_normal((B, H, S, D)).astype(np.float32)
    pos = rng.integers(0, 64, (B, S))
    y = rotary.rotate(c, "x", rotary.tables(c, "pos", "full_attention"))
    (got,) = run(c.g, {"x": x, "pos": pos}, [y])
    np.testing.assert_allclose(got, reference(x, pos, lay.inv_freq["full_attention"], rd), rtol=1e-4, atol=1e-4)


def test_cached(seed):
    rng = np.random.default_rng(seed)
    lay = layout()
    c = context(lay, {}, "fused")
    assert c.spec.rotary == "cached"
    x = rng.standard_normal((B, S, H * D)).astype(np.float32)
    pos = rng.integers(0, 64, (B, S))
    y = rotary.rotate(c, "x", rotary.tables(c, "pos", "full_attention"))
    (got,) = run(c.g, {"x": x, "pos": pos}, [y])
    heads = x.reshape(B, S, H, D).transpose(0, 2, 1, 3)
    want = reference(heads, pos, lay.inv_freq["full_attention"], D).transpose(0, 2, 1, 3).reshape(B, S, H * D)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert op_types(c.g) == ["RotaryEmbedding", "Identity"]  # the Identity names the output


def test_which_layouts_cache_their_tables():
    assert rotary.cache_fits(layout())
    assert not rotary.cache_fits(layout(rotary_dim=D // 2))  # partial rotary: computed
    assert not rotary.cache_fits(layout(max_context=rotary.MAX_CACHE_BYTES // (4 * D) + 1))  # too long
    assert context(layout(rotary_dim=D // 2), {}, "fused").spec.rotary == "computed"

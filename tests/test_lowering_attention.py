"""lowering/attention.py: masked softmax attention, GroupQueryAttention with growing KV and
GroupQueryAttention on fixed buffers (rotary inside), against numpy: left-padded batches, a past,
a sliding window. Fresh random inputs each run (``LOWERING_SEED=<seed>`` reruns one)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from _lowering import context, layout, op_types, run
from exporters.lowering import attention, rotary
from portable_infer.package import manifest as mf

H, KVH, D = 4, 2, 16
KV_NAMES = mf.present_names(0)


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("LOWERING_SEED") or random.SystemRandom().randrange(2**31))
    print(f"LOWERING_SEED={s}")
    return s


def heads(x: np.ndarray, n: int) -> np.ndarray:
    B, S, _ = x.shape
    return x.reshape(B, S, n, D).transpose(0, 2, 1, 3).astype(np.float64)


def softmax_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """q [B, H, S, D] over keys/values [B, KVH, T, D] where visible [B, 1, S, T] -> [B, S, H*D]."""
    rep = H // KVH
    scores = q @ np.repeat(keys, rep, 1).transpose(0, 1, 3, 2) * D ** -0.5
    scores = np.where(visible, scores, -np.inf)
    with np.errstate(invalid="ignore"):  # a row that sees no key (a padding query) is NaN
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out = (p / p.sum(-1, keepdims=True)) @ np.repeat(values, rep, 1)
    B, _, S, _ = out.shape
    return out.transpose(0, 2, 1, 3).reshape(B, S, H * D)


def rope(x: np.ndarray, pos: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """x [B, n, S, D] rotated at pos [B, S] (full rotary)."""
    f = pos[:, None, :, None] * inv
    cos, sin = np.cos(np.concatenate([f, f], -1)), np.sin(np.concatenate([f, f], -1))
    return x * cos + np.concatenate([-x[..., D // 2:], x[..., : D // 2]], -1) * sin


# (batch, past, new, left padding of row 0): a left-padded prefill and a decode step
CASES = {"prefill": (2, 0, 6, 2), "decode": (2, 5, 1, 3)}


@pytest.mark.parametrize("variant", ["portable", "fused"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window", [None, 3])
def test_growing_kv(variant, case, window, seed):
    rng = np.random.default_rng(seed)
    B, P, S, pad = CASES[case]
    T = P + S
    kind = "sliding_attention" if window else "full_attention"
    c = context(layout(window=window, layer_types=(kind,)), {}, variant)
    assert c.spec.attention == {"portable": "masked", "fused": "gqa"}[variant]
    a = attention.inputs(c, "ids", "mask", kind)
    out, k, v = attention.attend(c, 0, "q", "k", "v", ("pk", "pv"), a, None)
    mask = np.ones((B, T), np.int64)
    mask[0, :pad] = 0
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    feeds = {"ids": np.zeros((B, S), np.int64), "mask": mask, "q": f(B, S, H * D), "k": f(B, S, KVH * D),
             "v": f(B, S, KVH * D), "pk": f(B, KVH, P, D), "pv": f(B, KVH, P, D)}
    got, present_k, present_v = run(c.g, feeds, [out, k, v])
    keys = np.concatenate([feeds["pk"], heads(feeds["k"], KVH)], 2)
    values = np.concatenate([feeds["pv"], heads(feeds["v"], KVH)], 2)
    qpos, t = T - S + np.arange(S), np.arange(T)
    visible = (t <= qpos[:, None]) & ((t > qpos[:, None] - window) if window else True)
    visible = visible[None, None] & mask[:, None, None, :].astype(bool)
    want = softmax_attention(heads(feeds["q"], H), keys, values, visible)
    real = mask[:, T - S:].astype(bool)  # a padding query sees nothing: its output is not used
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(present_k, keys, rtol=1e-6)
    np.testing.assert_allclose(present_v, values, rtol=1e-6)
    assert ("GroupQueryAttention" in op_types(c.g)) == (variant == "fused")


@pytest.mark.parametrize("case", ["prefill", "decode"])
def test_static_buffers(case, seed):
    """Each row's tokens from index 0 of a [B, KVH, capacity, D] buffer; the new keys are rotated
    at the row's own positions and written at [n - S, n)."""
    rng = np.random.default_rng(seed)
    C = 8
    lay = layout()
    c = context(lay, {}, "static")
    a = attention.inputs(c, "ids", mf.ATTENTION_MASK, "full_attention")
    out, k, v = attention.attend(c, 0, "q", "k", "v", ("pk", "pv"), a, rotary.tables(c, None, "full_attention"))
    n = np.array([5]) if case == "prefill" else np.array([3, 7])  # tokens per row, the new ones included
    B, S = len(n), (5 if case == "prefill" else 1)
    T = S if case == "prefill" else C
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    feeds = {mf.ATTENTION_MASK: (np.arange(T) < n[:, None]).astype(np.int64),
             mf.TOTAL_SEQUENCE_LENGTH: np.array(T, np.int32), "q": f(B, S, H * D), "k": f(B, S, KVH * D),
             "v": f(B, S, KVH * D), "pk": f(B, KVH, C, D), "pv": f(B, KVH, C, D)}
    got, present_k, present_v = run(c.g, feeds, [out, k, v])
    inv = lay.inv_freq["full_attention"].astype(np.float64)
    pos = n[:, None] - S + np.arange(S)
    new_k, new_v = rope(heads(feeds["k"], KVH), pos, inv), heads(feeds["v"], KVH)
    q = rope(heads(feeds["q"], H), pos, inv)
    for b, nb in enumerate(n):
        keys = np.concatenate([feeds["pk"][b:b + 1, :, : nb - S], new_k[b:b + 1]], 2)
        values = np.concatenate([feeds["pv"][b:b + 1, :, : nb - S], new_v[b:b + 1]], 2)
        visible = (np.arange(nb) <= pos[b][:, None])[None, None]
        want = softmax_attention(q[b:b + 1], keys, values, visible)
        np.testing.assert_allclose(got[b:b + 1], want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(present_k[b, :, :nb], keys[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(present_v[b, :, :nb], values[0], rtol=1e-6)
    assert mf.POSITION_IDS not in {i.name for i in c.g.inputs}


def test_static_needs_full_rotary_without_windows():
    assert attention.static_fits(layout())
    assert not attention.static_fits(layout(rotary_dim=D // 2))
    assert not attention.static_fits(layout(window=3, layer_types=("sliding_attention",)))
    assert not attention.static_fits(layout(positions="learned"))

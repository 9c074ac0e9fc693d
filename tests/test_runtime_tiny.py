"""The runtime on a real ONNX graph: a tiny random llama exported at fp32 (no tokenizer).

Invariants that need no reference (cached decode == full recompute, batch == one by one) and
greedy parity with transformers. Prompts come from a fresh random seed each run, printed in
every assertion message; rerun one with ``RUNTIME_SEED=<seed> pytest ...``.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from _decode import greedy_steps

torch = pytest.importorskip("torch")

import portable_infer  # noqa: E402

SEED = int(os.environ.get("RUNTIME_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[RUNTIME_SEED={SEED}]"
STEPS = 20
LOGIT_TOL = 1e-4
VARIANTS = ("portable", "fused")


@pytest.fixture(scope="module", params=VARIANTS)
def model(request, tiny_llama, load_variant):
    return load_variant(tiny_llama.package, request.param)


@pytest.fixture
def rng(request):
    # One stream per test, derived from the run's seed, so a failing test reruns alone.
    return np.random.default_rng([SEED, sum(map(ord, request.node.name))])


def prompt(rng, n: int, vocab: int = 256) -> list:
    return rng.integers(3, vocab, n).tolist()  # never 0 (pad), 1 (bos) or 2 (eos)


def test_load_runs_on_cpu_provider(tiny_llama):
    model = portable_infer.load(tiny_llama.package, intra_op_threads=2)
    assert model.provider == "CPUExecutionProvider"
    assert model.tokenizer is None and model.max_context == 256
    assert "llama" in repr(model) and model.variant == "static"  # the default where the package has it
    assert portable_infer.load(tiny_llama.package, intra_op_threads=2, static_kv=False).variant == "fused"


def test_every_variant_runs_on_cpu(model):
    assert model.provider == "CPUExecutionProvider"


def test_cached_decode_equals_full_recompute(model, rng):
    ids = prompt(rng, 11)
    engine = model.engine
    cache = engine.new_cache(1)
    tokens, cached = greedy_steps(model, ids, STEPS, cache)
    seq = ids + tokens
    assert cache.length == len(seq) - 1  # every token but the last was fed

    # full recompute, no cache reuse: a fresh prefill of every prefix
    fresh = []
    for n in range(len(ids), len(seq)):
        prefix = np.asarray([seq[:n]], np.int64)
        fresh.append(engine.forward(prefix, np.ones_like(prefix), engine.new_cache(1))[0])
    diff = float(np.abs(cached - np.stack(fresh)).max())
    assert diff <= LOGIT_TOL, f"{TAG} cached decode differs from recompute by {diff:.2e}"

    # teacher forcing over the whole sequence
    full = model.forward_logits(seq[:-1])
    assert full.shape == (len(seq) - 1, 256)
    diff = float(np.abs(cached - full[len(ids) - 1:]).max())
    assert diff <= LOGIT_TOL, f"{TAG} forward_logits differs from cached decode by {diff:.2e}"

    assert np.argmax(full[len(ids) - 1:], axis=-1).tolist() == seq[len(ids):], TAG
    assert model.generate_ids(ids, max_new_tokens=STEPS, ignore_eos=True) == seq[len(ids):], TAG


def test_batch_equals_one_by_one(model, rng):
    prompts = [prompt(rng, n) for n in (3, 9, 17)]
    batch = model.batch_generate_ids(prompts, max_new_tokens=STEPS, ignore_eos=True)
    single = [model.generate_ids(p, max_new_tokens=STEPS, ignore_eos=True) for p in prompts]
    assert [len(b) for b in batch] == [STEPS] * 3
    for i, (b, s) in enumerate(zip(batch, single)):
        assert b == s, f"{TAG} prompt {i} (length {len(prompts[i])}): batch {b} vs alone {s}"


def test_greedy_equals_transformers(model, tiny_llama, rng):
    """Our greedy tokens are transformers' greedy tokens. Checked teacher-forced on our sequence:
    at every step the reference's logit for our token must be its maximum, up to 1e-4 (random tiny
    models have near-ties, where either choice is greedy and the sequences may then part)."""
    hf = tiny_llama.model
    for n in (1, 6, 13):
        ids = prompt(rng, n)
        ours = model.generate_ids(ids, max_new_tokens=STEPS, ignore_eos=True)
        assert len(ours) == STEPS
        with torch.no_grad():
            logits = hf(torch.tensor([ids + ours])).logits[0, n - 1:-1].numpy()
        gap = logits.max(-1) - logits[np.arange(STEPS), ours]
        assert gap.max() <= 1e-4, (f"{TAG} prompt {ids}: step {int(gap.argmax())} chose {ours[int(gap.argmax())]}, "
                                   f"{gap.max():.3g} below transformers' best {int(logits[int(gap.argmax())].argmax())}")


def test_forward_logits_match_transformers(model, tiny_llama, rng):
    ids = prompt(rng, 24)
    with torch.no_grad():
        ref = tiny_llama.model(torch.tensor([ids])).logits[0].numpy()
    ours = model.forward_logits(ids)
    diff = float(np.abs(ours - ref).max())
    assert diff <= LOGIT_TOL * max(1.0, float(np.abs(ref).max())), f"{TAG} max |diff| {diff:.2e}"


def test_sampling_is_reproducible_on_the_real_graph(model, rng):
    ids = prompt(rng, 5)
    a = model.generate_ids(ids, max_new_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    b = model.generate_ids(ids, max_new_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    assert a == b, TAG


def test_stream_generate_without_tokenizer_yields_tokens(model, rng):
    ids = prompt(rng, 4)
    rs = list(model.stream_generate(ids, max_new_tokens=5, ignore_eos=True))
    assert [r.token for r in rs] == model.generate_ids(ids, max_new_tokens=5, ignore_eos=True)
    assert rs[-1].finish_reason == "length" and rs[0].prompt_tokens == 4


def test_multi_token_continuation_of_a_left_padded_batch(model, rng):
    """Several new tokens after a past, batch 2, left padding: what a row gets equals running it
    alone (the fused graph's GroupQueryAttention refuses this call shape; the engine splits it)."""
    engine, short, long_ = model.engine, prompt(rng, 4), prompt(rng, 7)
    more = [prompt(rng, 3), prompt(rng, 3)]
    pad = len(long_) - len(short)
    ids = np.asarray([[0] * pad + short, long_], np.int64)
    mask = np.asarray([[0] * pad + [1] * len(short), [1] * len(long_)], np.int64)
    cache = engine.new_cache(2)
    engine.forward(ids, mask, cache)
    mask2 = np.concatenate([mask, np.ones((2, 3), np.int64)], axis=1)
    both = engine.forward(np.asarray(more, np.int64), mask2, cache)
    assert cache.length == len(long_) + 3
    for row, (p, m) in enumerate(zip((short, long_), more)):
        alone = model.forward_logits(p + m)[-1]
        diff = float(np.abs(both[row] - alone).max())
        assert diff <= LOGIT_TOL, f"{TAG} {model.variant} row {row} differs from running alone by {diff:.2e}"
    nxt = engine.forward(np.asarray([[5], [6]], np.int64), np.concatenate([mask2, np.ones((2, 1), np.int64)], 1), cache)
    assert nxt.shape == (2, 256) and np.isfinite(nxt).all()

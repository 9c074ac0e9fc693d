"""Logit bias and the grammar mask as logit processors, and the per-token rule (Sequence) on
hand-made logits: no model runs here."""

from __future__ import annotations

import numpy as np
import pytest

from portable_infer.errors import InvalidArgumentError
from portable_infer.decode.processors import LogitBias, apply_mask, check_logit_bias

SEED = 97


@pytest.mark.parametrize("value, expected", [
    ({7: 2.5, "3": -100}, ((3, -100.0), (7, 2.5))),
    ([(1, 1), (0, 0.5)], ((0, 0.5), (1, 1.0))),
    ({}, ()),
])
def test_logit_bias_normalized(value, expected):
    assert check_logit_bias(value) == expected
    assert check_logit_bias(check_logit_bias(value)) == expected  # the stored form reads back


@pytest.mark.parametrize("value, words", [
    ({1: 100.5}, "[-100, 100]"),
    ({1: float("nan")}, "[-100, 100]"),
    ({1: True}, "[-100, 100]"),
    ({-1: 1.0}, "token ids"),
    ({"x": 1.0}, "token ids"),
    ({True: 1.0}, "token ids"),
    ([(1, 1.0), ("1", 2.0)], "twice"),
    ("1:2", "dict"),
    ([1, 2], "map token ids"),
])
def test_bad_logit_bias_is_typed(value, words):
    with pytest.raises(InvalidArgumentError, match=__import__("re").escape(words)) as e:
        check_logit_bias(value)
    assert e.value.param == "logit_bias"


def test_logit_bias_adds_and_copies():
    x = np.array([1.0, 2.0, 3.0], np.float32)
    out = LogitBias(((0, 5.0), (2, -1.0)))(x)
    np.testing.assert_array_equal(out, [6.0, 2.0, 2.0])
    np.testing.assert_array_equal(x, [1.0, 2.0, 3.0])
    assert out.dtype == np.float32
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary") as e:
        LogitBias(((3, 1.0),), vocab_size=3)
    assert e.value.param == "logit_bias"


def test_apply_mask():
    x = np.array([1.0, 5.0, 3.0], np.float32)
    out = apply_mask(x, np.array([True, False, True]))
    np.testing.assert_array_equal(out, [1.0, -np.inf, 3.0])
    assert out.dtype == np.float32 and x[1] == 5.0
    rng = np.random.default_rng(SEED)
    print("seed", SEED)
    for dtype in (np.float32, np.float16, np.float64):
        x = (rng.standard_normal(1000) * 30).astype(dtype)
        x[:3] = (-np.inf, 0.0, -0.0)
        allowed = rng.random(1000) < 0.5
        out = apply_mask(x, allowed)
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, np.where(allowed, x, -np.inf))
        rows = x.reshape(4, 250), allowed.reshape(4, 250)  # a batch's rows in one call
        np.testing.assert_array_equal(apply_mask(*rows), [apply_mask(r, a) for r, a in zip(*rows)])


# --- the per-token rule ---------------------------------------------------------------------------
def _seq(vocab=8, **kw):
    from portable_infer.decode.sampling import SamplingParams
    from portable_infer.decode.sequence import Sequence

    return Sequence([1, 2, 3], SamplingParams(**kw), eos_ids=[0], vocab_size=vocab)


def test_bias_forces_and_bans():
    rng = np.random.default_rng(SEED)
    print("seed", SEED)
    logits = rng.standard_normal((50, 8)).astype(np.float32)
    forced = _seq(temperature=1.0, seed=1, logit_bias={5: 100}, max_new_tokens=50)
    banned = _seq(temperature=1.0, seed=1, logit_bias={int(np.argmax(logits[0])): -100}, max_new_tokens=50)
    picks = [forced.step(x, max_context=1000).token for x in logits]
    assert picks == [5] * 50
    bad = int(np.argmax(logits[0]))
    assert bad not in [banned.step(x, max_context=1000).token for x in logits]


def test_logprobs_are_of_the_biased_distribution():
    from portable_infer.decode.sampling import log_softmax

    x = np.log(np.array([0.1, 0.2, 0.3, 0.4], np.float32))
    s = _seq(vocab=4, logit_bias={0: 2.0}, logprobs=2)
    pick = s.step(x, max_context=100)
    expect = log_softmax(x + np.array([2.0, 0, 0, 0], np.float32))
    assert pick.token == 0 and pick.logprob == pytest.approx(expect[0], abs=1e-6)
    assert [t for t, _ in pick.top_logprobs] == [0, 3]


def test_stop_and_length_rules():
    x = np.array([0, 0, 9, 0], np.float32)
    assert _seq(vocab=4, max_new_tokens=2).step(x, max_context=100).finish_reason is None
    s = _seq(vocab=4, max_new_tokens=2)
    s.step(x, max_context=100)
    assert s.step(x, max_context=100).finish_reason == "length"
    assert _seq(vocab=4).step(x, max_context=4).finish_reason == "length"  # 3 prompt + 1 = context
    assert _seq(vocab=4).step(x, max_context=100, full=True).finish_reason == "length"
    assert _seq(vocab=4, stop_token_ids=[2]).step(x, max_context=100).finish_reason == "stop"
    assert _seq(vocab=4, logit_bias={0: 50}).step(x, max_context=100).finish_reason == "stop"  # eos 0


def test_bias_id_outside_vocab_fails_at_construction():
    with pytest.raises(InvalidArgumentError) as e:
        _seq(vocab=8, logit_bias={8: 1.0})
    assert e.value.param == "logit_bias"


class _Grammar:
    """A stand-in grammar matcher: every token is fed, none ends it."""

    def consume_token(self, token):
        return True

    def is_stopped(self):
        return False

    def is_accepting(self):
        return False


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_constrained_rows_that_draw_first_sample_the_masked_distribution(temperature, monkeypatch):
    """A constrained row sampling the whole distribution draws first and applies its mask only when
    the grammar refuses the draw, then draws again: the tokens follow softmax(logits / T) over the
    allowed tokens (total variation within sampling noise), no refused token ever comes out, and
    the mask was applied on some steps only."""
    from portable_infer.decode import sequence as seq_mod
    from portable_infer.decode.sampling import SamplingParams
    from portable_infer.decode.sequence import Sequence

    rng = np.random.default_rng(SEED + int(temperature * 10))
    vocab, n = 64, 20000
    logits = (rng.standard_normal(vocab) * 2).astype(np.float32)
    allowed = rng.random(vocab) < 0.5
    bitmask = np.packbits(allowed, bitorder="little").view(np.int32)  # bit v % 32 of word v // 32
    monkeypatch.setattr(seq_mod, "consume", lambda matcher, token: None)
    applied = []
    real_allowed = seq_mod.allowed_tokens  # the row's mask is unpacked only for a refused draw
    monkeypatch.setattr(seq_mod, "allowed_tokens", lambda m, v: applied.append(1) or real_allowed(m, v))
    seq = Sequence([1], SamplingParams(temperature=temperature, seed=int(rng.integers(1000)), max_new_tokens=n + 1))
    seq.matcher, seq.mask_vocab = _Grammar(), vocab
    assert seq.draws_first and not seq.mask_first
    counts = np.zeros(vocab)
    for _ in range(n):
        counts[seq.step(logits, mask=bitmask, max_context=10**9).token] += 1
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    want = np.where(allowed, p, 0.0) / p[allowed].sum()
    assert counts[~allowed].sum() == 0, SEED
    tvd = 0.5 * np.abs(counts / n - want).sum()
    assert tvd < 0.03, (SEED, tvd)
    refused = float(p[~allowed].sum())  # how often the first draw is refused
    assert 0 < len(applied) < n and abs(len(applied) / n - refused) < 0.03, (SEED, len(applied) / n, refused)

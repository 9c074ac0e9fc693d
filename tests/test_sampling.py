"""Pure units for portable_infer.decode.sampling, with hand-computed expectations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from portable_infer.errors import GenerationError, InvalidArgumentError
from portable_infer.decode.draw import apply_temperature, draw, rejection_draw
from portable_infer.decode.sampling import (
    MAX_LOGPROBS, SamplingParams, apply_min_p, apply_penalties, apply_top_k, apply_top_p, log_softmax,
    make_sampler, sample, token_logprobs,
)

VOCAB = 49152


def logits_of(probs) -> np.ndarray:
    """Logits whose softmax is ``probs``; zero probabilities become -inf."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(probs, dtype=np.float64))


def kept(masked: np.ndarray) -> list[int]:
    return np.flatnonzero(masked > -np.inf).tolist()


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# --- SamplingParams -------------------------------------------------------------------------------
def test_defaults_are_greedy_and_valid():
    p = SamplingParams()
    assert p.temperature == 0.0 and p.top_k == 0 and p.top_p == 1.0 and p.logprobs is None


def test_lists_become_tuples_and_params_are_frozen():
    p = SamplingParams(stop=["\n\n", "###"], stop_token_ids=[2, np.int64(7)])
    assert p.stop == ("\n\n", "###")
    assert p.stop_token_ids == (2, 7) and all(type(i) is int for i in p.stop_token_ids)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]


def test_end_ids_are_stop_ids_and_eos_unless_ignored():
    p = SamplingParams(stop_token_ids=[2, 7])
    assert p.end_ids((0, 7)) == {0, 2, 7} and p.end_ids() == {2, 7}
    assert dataclasses.replace(p, ignore_eos=True).end_ids((0,)) == {2, 7}


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "hot"), ("temperature", True),
    ("top_k", -1), ("top_k", 1.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2),
    ("min_p", 1.0), ("min_p", -0.01),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5),
    ("max_new_tokens", 0), ("max_new_tokens", 2.0),
    ("seed", -1), ("seed", 1.5), ("seed", "42"),
    ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("logprobs", 1.0),
    ("stop", "###"), ("stop", [""]), ("stop", [3]),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", 5),
    ("ignore_eos", 1),
])
def test_bad_parameter_raises_naming_it(field, value):
    with pytest.raises(InvalidArgumentError, match=field) as info:
        SamplingParams(**{field: value})
    assert repr(value) in str(info.value) or field in ("stop", "stop_token_ids")


def test_message_names_range_and_value():
    with pytest.raises(InvalidArgumentError, match=r"top_p must be in \(0, 1\], got 1\.5"):
        SamplingParams(top_p=1.5)


@pytest.mark.parametrize("field, value", [
    ("temperature", 0.0), ("temperature", 2), ("top_k", 0), ("top_p", 1.0), ("top_p", 1e-6),
    ("min_p", 0.0), ("min_p", 0.99), ("presence_penalty", -2), ("frequency_penalty", 2.0),
    ("seed", 0), ("logprobs", 0), ("logprobs", MAX_LOGPROBS), ("max_new_tokens", 1),
])
def test_boundary_values_are_accepted(field, value):
    assert getattr(SamplingParams(**{field: value}), field) == value


def test_from_kwargs_overrides_defaults():
    base = SamplingParams(temperature=0.7, top_k=40)
    p = SamplingParams.from_kwargs(base, top_p=0.9)
    assert (p.temperature, p.top_k, p.top_p) == (0.7, 40, 0.9)
    assert SamplingParams.from_kwargs(top_k=5) == SamplingParams(top_k=5)


def test_from_kwargs_rejects_unknown_key_listing_valid_ones():
    with pytest.raises(InvalidArgumentError, match="top_q") as info:
        SamplingParams.from_kwargs(top_q=0.9)
    message = str(info.value)
    assert all(f.name in message for f in dataclasses.fields(SamplingParams))


def test_from_kwargs_validates_values():
    with pytest.raises(InvalidArgumentError, match="temperature"):
        SamplingParams.from_kwargs(SamplingParams(), temperature=-1)


# --- filters -------------------------------------------------------------------------------------
def test_top_p_keeps_only_the_dominant_token():
    assert kept(apply_top_p(logits_of([0.9, 0, 0, 0.1]), 0.5)) == [0]


def test_top_p_keeps_smallest_set_reaching_p():
    x = logits_of([0.1, 0.5, 0.15, 0.25])  # sorted: 1 (.5), 3 (.75), 2 (.9), 0 (1.0)
    assert kept(apply_top_p(x, 0.7)) == [1, 3]
    assert kept(apply_top_p(x, 0.8)) == [1, 2, 3]
    assert kept(apply_top_p(x, 0.95)) == [0, 1, 2, 3]
    assert kept(apply_top_p(x, 1e-9)) == [1]  # at least one token
    assert apply_top_p(x, 1.0) is x  # off


def test_top_p_large_vocab_matches_full_sort():
    rng = np.random.default_rng()
    for scale in (0.5, 3.0, 8.0):  # flat (falls back to a full sort) to peaked (top candidates)
        x = rng.standard_normal(VOCAB) * scale
        probs = softmax(x)
        order = np.argsort(-probs)
        n = int(np.searchsorted(np.cumsum(probs[order]), 0.9)) + 1
        assert kept(apply_top_p(x, 0.9)) == sorted(order[:n].tolist())


def test_top_k():
    x = np.array([1.0, 5.0, 3.0, 4.0, -2.0])
    assert kept(apply_top_k(x, 2)) == [1, 3]
    assert kept(apply_top_k(x, 1)) == [1]
    assert apply_top_k(x, 0) is x and apply_top_k(x, 5) is x
    masked = apply_top_k(x, 3)
    assert masked[1] == 5.0 and masked[2] == 3.0  # kept logits are unchanged


def test_top_k_large_vocab_matches_sort():
    x = np.random.default_rng().standard_normal(VOCAB).astype(np.float32)
    assert kept(apply_top_k(x, 50)) == sorted(np.argsort(-x)[:50].tolist())


def test_min_p_drops_tokens_below_fraction_of_top():
    x = logits_of([0.5, 0.3, 0.15, 0.05])  # threshold 0.2 * 0.5 = 0.1
    assert kept(apply_min_p(x, 0.2)) == [0, 1, 2]
    assert kept(apply_min_p(x, 0.7)) == [0]  # threshold 0.35
    assert apply_min_p(x, 0.0) is x


def test_temperature_scales_logits():
    np.testing.assert_allclose(apply_temperature(np.array([2.0, -4.0], np.float32), 2.0), [1.0, -2.0])
    assert apply_temperature(np.zeros(3, np.float32), 0.5).dtype == np.float32


def test_filters_do_not_mutate_their_input():
    x = np.random.default_rng().standard_normal(100)
    before = x.copy()
    apply_top_k(x, 5), apply_top_p(x, 0.5), apply_min_p(x, 0.3), apply_temperature(x, 0.5)
    np.testing.assert_array_equal(x, before)


# --- penalties -----------------------------------------------------------------------------------
def test_repetition_penalty_hand_computed():
    logits = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
    p = SamplingParams(repetition_penalty=2.0)
    out = apply_penalties(logits, prompt_ids=[0], output_ids=[1, 1], params=p)
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5, 3.0])  # 2/2, -1*2, untouched, untouched
    assert out.dtype == np.float32
    np.testing.assert_array_equal(logits, [2.0, -1.0, 0.5, 3.0])  # input not mutated


def test_presence_and_frequency_hand_computed():
    logits = np.ones(4, np.float32)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, prompt_ids=[0, 1], output_ids=[2, 2, 3], params=p)
    # token 2: 1 - 0.5 - 2*0.25 = 0; token 3: 1 - 0.5 - 0.25 = 0.25; prompt tokens untouched
    np.testing.assert_allclose(out, [1.0, 1.0, 0.0, 0.25])


def test_all_penalties_together():
    logits = np.array([4.0, -2.0, 1.0], np.float32)
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5)
    out = apply_penalties(logits, prompt_ids=[2], output_ids=[0, 1, 0], params=p)
    # 0: 4/2 - 1 - 2*0.5 = 0;  1: -2*2 - 1 - 0.5 = -5.5;  2 (prompt only): 1/2 = 0.5
    np.testing.assert_allclose(out, [0.0, -5.5, 0.5])


def test_neutral_penalties_copy_unchanged():
    logits = np.random.default_rng().standard_normal(10).astype(np.float32)
    out = apply_penalties(logits, [1, 2], [3], SamplingParams())
    np.testing.assert_array_equal(out, logits)
    assert out is not logits


def test_penalties_reject_out_of_range_ids():
    with pytest.raises(InvalidArgumentError, match="output_ids"):
        apply_penalties(np.zeros(4), [], [4], SamplingParams(frequency_penalty=1.0))
    with pytest.raises(InvalidArgumentError, match="prompt_ids"):
        apply_penalties(np.zeros(4), [-1], [], SamplingParams(repetition_penalty=1.1))


# --- sampling ------------------------------------------------------------------------------------
def test_greedy_is_argmax_and_leaves_rng_alone():
    rng = np.random.default_rng()
    x = rng.standard_normal(VOCAB).astype(np.float32)
    state = rng.bit_generator.state
    assert sample(x, SamplingParams(), rng) == int(np.argmax(x))
    assert rng.bit_generator.state == state


def test_same_seed_same_draws_different_seeds_differ():
    x = np.random.default_rng().standard_normal(1000)
    sampler = make_sampler(SamplingParams(temperature=1.0))

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [sampler(x, rng) for _ in range(50)]

    assert draws(1234) == draws(1234)
    assert draws(1234) != draws(4321)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_empirical_distribution_matches_softmax(temperature):
    rng = np.random.default_rng()
    x = rng.standard_normal(8) * 1.5
    sampler = make_sampler(SamplingParams(temperature=temperature))
    n = 20_000
    freq = np.bincount([sampler(x, rng) for _ in range(n)], minlength=8) / n
    expected = softmax(x / temperature)
    tolerance = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-3  # 5 sigma per token
    assert np.all(np.abs(freq - expected) <= tolerance), (freq, expected)


def test_draw_across_blocks_including_a_partial_last_one():
    rng = np.random.default_rng()
    vocab = 4 * 256 + 17  # draw() works in blocks of 256 tokens; the last one is short
    hot = [int(rng.integers(0, 256)), int(rng.integers(512, 768)), int(rng.integers(1024, vocab))]
    x = np.full(vocab, -np.inf)
    x[hot] = [0.0, math.log(2), math.log(3)]  # probs 1/6, 2/6, 3/6
    n = 12_000
    counts = np.bincount([draw(x, rng) for _ in range(n)], minlength=vocab)
    assert set(np.flatnonzero(counts).tolist()) <= set(hot)  # never a token of zero probability
    np.testing.assert_allclose(counts[hot] / n, [1 / 6, 2 / 6, 3 / 6], atol=0.025)


def test_sampled_tokens_respect_filters():
    rng = np.random.default_rng()
    x = rng.standard_normal(VOCAB).astype(np.float32) * 3
    allowed = set(np.argsort(-x)[:5].tolist())
    sampler = make_sampler(SamplingParams(temperature=1.5, top_k=5, top_p=0.99, min_p=0.01))
    assert {sampler(x, rng) for _ in range(300)} <= allowed
    top_p_only = make_sampler(SamplingParams(temperature=1.0, top_p=0.5))
    assert {top_p_only(logits_of([0.9, 0, 0, 0.1]), rng) for _ in range(200)} == {0}


def test_sampler_rejects_bad_logits():
    sampler = make_sampler(SamplingParams(temperature=1.0))
    with pytest.raises(InvalidArgumentError, match="1-D"):
        sampler(np.zeros((2, 3)), np.random.default_rng())
    with pytest.raises(GenerationError, match="NaN"):  # the model's output, not the request's values
        sampler(np.array([np.nan, 1.0]), np.random.default_rng())


@pytest.mark.parametrize("temperature", [0.6, 1.4])
def test_rejection_draw_samples_the_allowed_tokens_softmax(temperature):
    """Draw first, and only where the draw is refused again from the same weights with the refused
    tokens zeroed: the tokens follow softmax(x / T) over the allowed tokens, a refused one never
    comes out, and the mask is applied as often as the refused tokens' mass says."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print("seed", seed)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(300) * 2).astype(np.float32)  # two draw blocks, the last one short
    keep = rng.random(300) < 0.3
    keep[int(np.argmax(x))] = False  # the likeliest token refused: many second draws
    n, counts, asked = 20_000, np.zeros(300), []  # allowed() is asked for on a refused draw only
    for _ in range(n):
        counts[rejection_draw(x, temperature, rng, lambda: asked.append(1) or keep, lambda t: bool(keep[t]))] += 1
    masked = len(asked)
    p = softmax(x.astype(np.float64) / temperature)
    want = np.where(keep, p, 0.0) / p[keep].sum()
    assert counts[~keep].sum() == 0, seed
    tolerance = 5 * np.sqrt(want * (1 - want) / n) + 1e-3
    assert np.all(np.abs(counts / n - want) <= tolerance), seed
    assert abs(masked / n - p[~keep].sum()) < 0.02, seed
    # without a fast check, allowed() decides: the same tokens from the same seed
    a, b = np.random.default_rng(seed), np.random.default_rng(seed)
    assert [rejection_draw(x, temperature, a, lambda: keep) for _ in range(200)] == \
        [rejection_draw(x, temperature, b, lambda: keep, lambda t: bool(keep[t])) for _ in range(200)]


def test_rejection_draw_when_the_allowed_weights_underflow_or_none_is_left():
    """Allowed tokens far below the best refused one (their float32 weights are 0 beside it) are
    drawn from their own softmax; no allowed token at all is no_candidates; NaN logits the
    sampler's own error."""
    rng = np.random.default_rng()
    x = np.array([200.0, 0.0, math.log(3.0), -np.inf], np.float32)
    keep = np.array([False, True, True, False])
    n = 8000
    counts = np.bincount([rejection_draw(x, 1.0, rng, lambda: keep) for _ in range(n)], minlength=4)
    assert counts[0] == counts[3] == 0
    np.testing.assert_allclose(counts[1:3] / n, [0.25, 0.75], atol=0.03)
    with pytest.raises(GenerationError, match="no token is left"):
        rejection_draw(x, 1.0, rng, lambda: np.zeros(4, bool))
    with pytest.raises(GenerationError, match="NaN"):
        rejection_draw(np.array([np.nan, 1.0]), 1.0, rng, lambda: np.ones(2, bool))
    with pytest.raises(InvalidArgumentError, match="temperature"):
        rejection_draw(np.array([3e38, 1.0], np.float32), 1e-3, rng, lambda: np.ones(2, bool))


# --- logprobs ------------------------------------------------------------------------------------
def test_log_softmax():
    x = np.random.default_rng().standard_normal(100) * 10
    lp = log_softmax(x)
    assert math.isclose(np.exp(lp).sum(), 1.0, rel_tol=1e-9)
    np.testing.assert_allclose(lp, np.log(softmax(x)))
    assert log_softmax(logits_of([0.5, 0.0, 0.5]))[1] == -np.inf


def test_token_logprobs_hand_computed():
    x = logits_of([0.1, 0.2, 0.3, 0.4])
    chosen, top = token_logprobs(x, 2, 2)
    assert math.isclose(chosen, math.log(0.3))
    assert [i for i, _ in top] == [3, 2]
    assert math.isclose(top[0][1], math.log(0.4)) and math.isclose(top[1][1], math.log(0.3))
    assert token_logprobs(x, 0, 0) == (pytest.approx(math.log(0.1)), [])
    assert [i for i, _ in token_logprobs(x, 0, 10)[1]] == [3, 2, 1, 0]  # k capped at vocab


def test_token_logprobs_validates():
    with pytest.raises(InvalidArgumentError, match="token_id"):
        token_logprobs(np.zeros(4), 4, 1)
    with pytest.raises(InvalidArgumentError, match="k must"):
        token_logprobs(np.zeros(4), 0, MAX_LOGPROBS + 1)

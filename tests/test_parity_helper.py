"""The greedy-parity helper (tests/_parity.py) needs a minimum of agreed steps: a near-tie at step 0
must not pass with nothing compared."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from _parity import first_divergence, margin

TOL = 1e-4


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("PARITY_HELPER_SEED") or random.SystemRandom().randrange(2**31))
    print(f"PARITY_HELPER_SEED={s}")
    return s


def _logits(rng, vocab: int, top: int, runner_up: int, gap: float) -> np.ndarray:
    """Random logits whose best token is ``top``, ``gap`` (relative) above ``runner_up``."""
    x = rng.normal(0.0, 1.0, vocab).astype(np.float64)
    x[top] = np.abs(x).max() + 1.0
    x[runner_up] = x[top] - gap * np.abs(x).max()
    return x


@pytest.fixture
def steps(seed):
    """8 reference steps of a random tiny model: greedy tokens and their logits, every margin clear."""
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, 64, 8).tolist()
    logits = [_logits(rng, 64, t, (t + 1) % 64, 0.1) for t in ref]
    return rng, ref, logits


def test_a_near_tie_at_step_0_no_longer_passes_with_nothing_agreed(steps):
    rng, ref, logits = steps
    logits[0] = _logits(rng, 64, ref[0], (ref[0] + 1) % 64, 1e-6)  # the reference is a near-tie at step 0
    assert margin(logits[0]) < TOL
    ours = [(ref[0] + 1) % 64] + rng.integers(0, 64, 7).tolist()  # the runner-up, then anything
    # the helper without a minimum (as it was) passes with 0 agreed steps
    assert first_divergence(ours, ref, logits, "old", tol=TOL, min_agreed=0) == 0
    with pytest.raises(AssertionError, match="before the 4 agreed steps"):
        first_divergence(ours, ref, logits, "new", tol=TOL)


def test_a_near_tie_after_the_minimum_is_excused(steps):
    rng, ref, logits = steps
    logits[5] = _logits(rng, 64, ref[5], (ref[5] + 1) % 64, 1e-6)
    ours = ref[:5] + [(ref[5] + 1) % 64, 0, 0]
    assert first_divergence(ours, ref, logits, "tie at 5", tol=TOL) == 5


def test_a_clear_divergence_always_fails(steps):
    _, ref, logits = steps
    ours = ref[:6] + [(ref[6] + 1) % 64, ref[7]]
    with pytest.raises(AssertionError, match="is no tie"):
        first_divergence(ours, ref, logits, "clear", tol=TOL)


def test_full_agreement_counts_every_step(steps):
    _, ref, logits = steps
    assert first_divergence(list(ref), ref, logits, "same", tol=TOL) == len(ref)
    assert first_divergence(list(ref), ref, logits, "same", tol=TOL, min_agreed=len(ref)) == len(ref)

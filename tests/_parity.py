"""Greedy parity between two token sequences, excusing only the reference's own near-ties (shared
by the parity tests; no pytest here)."""

from __future__ import annotations

import numpy as np


def margin(logits: np.ndarray) -> float:
    """Gap between the two best logits, relative to the logit scale (a near-tie is tiny)."""
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0]) / max(float(np.abs(logits).max()), 1e-12)


def first_divergence(ours: list, ref: list, ref_logits: list, what: str, *, tol: float,
                     min_agreed: int | None = None) -> int:
    """The number of steps on which ``ours`` and ``ref`` agree.

    A divergence fails unless the reference itself was a near-tie there (top-2 margin below
    ``tol``: either token is a greedy choice), and even then only after ``min_agreed`` agreed steps
    (default: half of ``ref``): a near-tie at step 0 would otherwise pass with nothing compared.
    ``min_agreed=0`` is the check without a minimum.
    """
    need = len(ref) // 2 if min_agreed is None else min_agreed
    for step, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            m = margin(ref_logits[step])
            assert m < tol, (f"{what}: greedy diverged at step {step} ({a} vs reference {b}) although "
                             f"the reference's top-2 margin {m:.2e} is no tie; ours {ours} ref {ref}")
            assert step >= need, (
                f"{what}: greedy diverged at step {step} ({a} vs reference {b}) at a reference near-tie "
                f"(margin {m:.2e}), before the {need} agreed steps a parity check needs: the comparison "
                f"proved too little; run it with another seed (prompt) to compare more steps")
            return step
    return len(ref)

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


def int4_variants_track(pkg, ids: np.ndarray, ref_last: np.ndarray, what: str) -> dict:
    """Every variant of the int4 package ``pkg`` (exported with head_accuracy=1) on ``ids``: the
    portable graph's last logits near the float reference's ``ref_last`` (random tiny models
    measured 12-32 % mean int4 noise; a wrong weight layout gives ~100 %), and each variant near the
    portable one (float activations: equal to 1e-3; int8 activations: near, 5e-2). Returns the
    last logits by variant name."""
    from exporters.graph_runs import decoder
    from portable_infer.package.manifest import Manifest

    manifest = Manifest.load(pkg)
    last = {}
    for v in manifest.variants:
        dec = decoder(pkg / v.file, v, manifest)
        last[v.name] = dec.run(ids, np.ones_like(ids), dec.empty_past(1))[0][:, -1]
    noise = float(np.abs(last["portable"] - ref_last).mean() / np.abs(ref_last).mean())
    assert noise < 0.6, f"{what} int4 portable: mean |diff| is {noise:.0%} of the mean |logit|"
    scale = np.abs(last["portable"]).max()
    for name, logits in last.items():
        rel = float(np.abs(logits - last["portable"]).max() / scale)
        bound = 5e-2 if name.endswith("-int8") else 1e-3
        assert rel <= bound, f"{what} int4 {name} differs from portable by {rel:.2e} (relative)"
    return last

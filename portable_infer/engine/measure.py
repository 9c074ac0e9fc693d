"""The loader's side of measured variant choice: which variants compete, and how one is timed.

After the provider rule (``variant_choice``) has picked a variant, the variants that could run in
its place on the same provider at the same KV growth compete (:func:`tuning_pool`): the exact ones
always, and int8-activation ones (``-int8``, ``-q4``) where the user's ``prefer``/``accuracy_level``
and the package's quality gate allow them. Each is timed for a few decode steps on this host
(:func:`step_seconds`) and :func:`portable_infer.engine.tune.choose` keeps the fastest (exact within
5 %), caching the decision. KV growth is not raced: static KV's advantage grows with the context,
which a few short steps do not show, so the provider rule keeps deciding it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from portable_infer.engine import tune
from portable_infer.engine.session import make_engine
from portable_infer.package.home import home
from portable_infer.engine.variant_choice import VariantChoice
from portable_infer.package.variants import is_int8, is_static

logger = logging.getLogger(__name__)

PREFERENCES = ("speed", "exact")
PROMPT_TOKENS = 16  # the prefill before the timed steps
STEPS = 6


def tune_cache_dir() -> Path:
    return home() / "tune"


def tuning_pool(spec, variants: Sequence, choice: VariantChoice, chosen) -> list:
    """The variants ``spec`` may run instead of ``chosen``: same KV growth, activations as allowed."""
    pool = [v for v in variants if spec.accepts(v) and is_static(v) == is_static(chosen)]
    if choice.int8 is True:
        pool = [v for v in pool if is_int8(v)]
    elif choice.int8 is False:
        pool = [v for v in pool if not is_int8(v)]
    else:
        pool = [v for v in pool if not is_int8(v) or v.name in choice.gated]
    return pool if chosen in pool else [chosen, *pool]


def step_seconds(engine, vocab_size: int, batch: int, steps: int = STEPS) -> float:
    """Median seconds of one decode step at ``batch`` rows after a short prefill (seeded ids)."""
    rng = np.random.default_rng(20261202)
    ids = rng.integers(3, vocab_size, size=(batch, PROMPT_TOKENS), dtype=np.int64)
    mask = np.ones_like(ids)
    cache = engine.new_cache(batch, PROMPT_TOKENS + steps + 4)
    engine.forward(ids, mask, cache)
    state = {"mask": mask, "tok": ids[:, -1:]}

    def step():
        state["mask"] = np.concatenate([state["mask"], np.ones((batch, 1), np.int64)], axis=1)
        engine.forward(state["tok"], state["mask"], cache)
    return tune.median_step_s(step, steps=steps, warmup=1)


def tuned(sel, manifest, pkg: Path, choice: VariantChoice, reselect, ort, *, threads: int, prefer: str,
          batches: Sequence[int], max_kv_tokens: int | None = None):
    """``sel``, or the selection of the variant that measured fastest on this host.

    ``reselect(variant)`` makes a selection of one variant on ``sel``'s provider.
    """
    pool = tuning_pool(sel.provider, manifest.variants, choice, sel.variant)
    if len(pool) < 2 or not tune.enabled():
        return sel
    candidates = [tune.Candidate(v.name, not is_int8(v)) for v in pool]
    key = tune.host_key(pkg, sel.provider.ort_name, threads, batches, prefer, candidates, ort.__version__)
    by_name = {v.name: v for v in pool}

    def time_variant(name: str, batch: int) -> float:
        s = sel if name == sel.variant.name else reselect(by_name[name])
        return step_seconds(make_engine(s, manifest, ort, max_kv_tokens), manifest.model.vocab_size, batch)

    decision = tune.choose(candidates, time_variant, key, tune_cache_dir(), remeasure=tune.forced())
    if decision.measured:
        logger.info("variant %s chosen on this host by measurement (ms per step: %s)", decision.chosen,
                    decision.timings_ms)
    return sel if decision.chosen == sel.variant.name else reselect(by_name[decision.chosen])

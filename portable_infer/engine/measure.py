"""The loader's side of measured variant choice: which variants compete, and how one is timed.

After the provider rule (``variant_choice``) has picked a variant, the variants that could run in
its place on the same provider at the same KV growth compete (:func:`tuning_pool`): the exact ones
always, and int8-activation ones (``-int8``, ``-q4``) where the user's ``prefer``/``accuracy_level``
and the package's quality gate allow them. Each is timed for a few decode steps on this host
(:func:`step_seconds`) and :func:`portable_infer.engine.tune.choose` keeps the fastest (exact within
5 %), caching the decision. KV growth is not raced: static KV's advantage grows with the context,
which a few short steps do not show, so the provider rule keeps deciding it.

Kernel switches race the same way: where the provider's row lists ``session_envs`` (CUDA: XQA off,
cuDNN's attention instead), each static variant is also timed in a session made with each of them
(a candidate named ``variant+switch``), its rows holding :data:`SWITCH_CONTEXT` tokens so that
attention's share shows. A switch whose variables the user set is theirs, not raced; one whose
session does not start (memory, build) drops out with a warning.
"""

from __future__ import annotations

import logging
import os
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
# The prefill before the timed steps where kernel switches race: attention's share grows with the
# context (H200, 8B shape, 256 rows of 256 tokens: XQA 4.0 ms a step, cuDNN 2.9; at 32-90 tokens
# XQA took 2.5), and served rows hold their prompt and what they generated.
SWITCH_CONTEXT = 256
STEPS = 6
# Steps run untimed before them, at least this long: a session's first steps after another
# session ran are up to 2x slower on a 2-core host (SmolLM2's float checkpoint on Zen 5: ~8 ms
# against 3.8 for its first 3-5 steps, while the other session's ONNX Runtime threads still spin),
# which with one warm-up step made the variant timed second lose (static-int8 measured 4.9-6.6 ms
# against 3.8 steady; docs/benchmarks.md, "Session 24").
WARMUP_S = 0.25
WARMUP_MAX = 48  # warm-up steps at most (the timing cache holds them)
PREFILL_TOKENS = 4096  # a timing prefill's tokens a forward at most (then rows in groups)
SEP = "+"  # a candidate's name: its variant, then the session environment it was made with, if any


def tune_cache_dir() -> Path:
    return home() / "tune"


def tuning_pool(spec, variants: Sequence, choice: VariantChoice, chosen) -> list:
    """The variants ``spec`` may run instead of ``chosen``: same KV growth, activations as allowed."""
    pool = [v for v in variants if spec.accepts(v) and v.kv.growth == chosen.kv.growth]
    if choice.int8 is True:
        pool = [v for v in pool if is_int8(v)]
    elif choice.int8 is False:
        pool = [v for v in pool if not is_int8(v)]
    else:
        pool = [v for v in pool if not is_int8(v) or v.name in choice.gated]
    return pool if chosen in pool else [chosen, *pool]


class _Untimed(Exception):
    """The selection that runs could not be timed."""


def session_envs(spec, variant) -> list:
    """The session environments ``variant`` races on ``spec``: as is (""), and for static-KV graphs
    each of the row's ``session_envs`` whose variables the user left unset."""
    if not is_static(variant):
        return [""]
    return ["", *(name for name, values in spec.session_envs.items() if not any(k in os.environ for k in values))]


def candidate_name(variant: str, env: str) -> str:
    return f"{variant}{SEP}{env}" if env else variant


def step_seconds(engine, vocab_size: int, batch: int, steps: int = STEPS, context: int = PROMPT_TOKENS) -> float:
    """Median seconds of one decode step at ``batch`` rows after a prefill of ``context`` tokens
    (fewer where the engine holds fewer; seeded ids). Graphs that pick greedy tokens on the device
    do so: copying every row's logits to the host (131 MB a step at 256 rows of a 128k vocabulary)
    would time the copy, not the graph."""
    runs = steps + WARMUP_MAX  # decode steps at most
    context = max(1, min(context, engine.max_context - runs - 4))
    rng = np.random.default_rng(20261202)
    ids = rng.integers(3, vocab_size, size=(batch, context), dtype=np.int64)
    mask = np.ones_like(ids)
    cache = _prefilled(engine, ids, context + runs + 4)
    state = {"mask": mask, "tok": ids[:, -1:]}

    greedy = engine.greedy_on_device  # the logits stay where they are: the forward is timed, not a copy of them

    def step():
        state["mask"] = np.concatenate([state["mask"], np.ones((batch, 1), np.int64)], axis=1)
        engine.forward(state["tok"], state["mask"], cache, greedy=greedy)
    return tune.median_step_s(step, steps=steps, warmup=1, warmup_s=WARMUP_S, warmup_max=WARMUP_MAX)


def _prefilled(engine, ids: np.ndarray, capacity: int):
    """A cache of ``ids``' rows after their prefill. Beyond PREFILL_TOKENS the rows prefill in
    groups into one buffer (static engines), as the scheduler's chunks do, and the cache is a view
    of all its rows (which keeps the buffer): a prefill of every row at once (65k tokens at 256
    rows of 256) would need memory serving never does."""
    batch, context = ids.shape
    group = max(1, PREFILL_TOKENS // context)
    if batch <= group or not hasattr(engine, "view"):
        cache = engine.new_cache(batch, capacity)
        engine.forward(ids, np.ones_like(ids), cache)
        return cache
    whole = engine.buffer(batch, capacity, most=capacity)  # not rounded up: 256 rows x 512 at 8B are 16 GiB
    for start in range(0, batch, group):
        part = engine.view(whole, start, min(group, batch - start))
        engine.forward(ids[start:start + part.batch], np.ones((part.batch, context), np.int64), part)
    cache = engine.view(whole, 0, batch, decode=True)
    cache.rows = np.full(batch, context, np.int64)
    return cache


def tuned(held: list, manifest, pkg: Path, choice: VariantChoice, reselect, ort, *, threads: int, prefer: str,
          batches: Sequence[int], max_kv_tokens: int | None = None):
    """The selection the provider rule made (taken out of ``held``, a one-item list the caller
    lets go of), or the selection of the candidate that measured fastest on this host.

    ``reselect(variant, session_env)`` makes a selection of one variant on its provider. One
    session is alive at a time: each candidate's is made when it is timed and released before the
    next one is made, so tuning peaks at one graph's memory, not two (SmolLM2's float checkpoint:
    362 MiB against 234 for its winner alone, docs/benchmarks.md, "Session 25"; an 8B on a GPU
    with room for one copy). The rule's own variant is timed first; where it wins after another
    was timed, it is made again.
    """
    sel = held.pop()
    pool = tuning_pool(sel.provider, manifest.variants, choice, sel.variant)
    entries = {candidate_name(v.name, e): (v, e) for v in pool for e in session_envs(sel.provider, v)}
    if len(entries) < 2 or not tune.enabled():
        return sel
    current = candidate_name(sel.variant.name, sel.session_env)
    order = sorted(entries, key=lambda name: name != current)  # the rule's variant first: it is alive
    candidates = [tune.Candidate(name, not is_int8(entries[name][0])) for name in order]
    key = tune.host_key(pkg, sel.provider.ort_name, threads, batches, prefer, candidates, ort.__version__)
    context = SWITCH_CONTEXT if any(e for _, e in entries.values()) else PROMPT_TOKENS

    alive = {current: sel}  # the one selection alive (each timed for all its batch sizes in a row)
    del sel

    def selection(name: str):
        if name not in alive:
            alive.clear()  # released before the next session is made
            alive[name] = reselect(*entries[name])
        return alive[name]

    def time_variant(name: str, batch: int) -> float:
        try:
            return step_seconds(make_engine(selection(name), manifest, ort, max_kv_tokens), manifest.model.vocab_size,
                                batch, context=context)
        except Exception as exc:  # noqa: BLE001 - ORT raises many types (memory, a kernel the build lacks)
            if name == current:
                raise _Untimed(f"{type(exc).__name__}: {exc}") from exc
            logger.warning("%s did not run on this host (%s: %s); it does not compete", name, type(exc).__name__, exc)
            return float("inf")

    try:
        decision = tune.choose(candidates, time_variant, key, tune_cache_dir(), remeasure=tune.forced())
    except _Untimed as exc:  # the session that runs could not be timed (memory?): nothing is decided or cached
        logger.warning("could not time %s on this host (%s); running it without measuring", current, exc)
        return selection(current)
    if decision.measured:
        logger.info("%s chosen on this host by measurement (ms per step: %s)", decision.chosen, decision.timings_ms)
    try:
        return selection(decision.chosen)
    except Exception as exc:  # noqa: BLE001 - a cached switch that no longer starts: run as is
        if not entries[decision.chosen][1]:
            raise
        logger.warning("%s, the measured choice, did not start (%s: %s); running %s", decision.chosen,
                       type(exc).__name__, exc, current)
        return selection(current)

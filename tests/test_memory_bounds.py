"""Memory bounds (issue 16, item 6) on the tiny llama.

batch_generate runs its prompts in sub-batches of at most ``max_batch_tokens`` KV tokens, with
the results of one-by-one runs in the prompts' order; large calls end with ONNX Runtime's arena
shrinkage and a dropped large cache gives its memory back; ``kv_cache_bytes`` counts the KV
really held (positions written), not a static buffer's virtual size. The RSS numbers these
produce on SmolLM2 are in docs/serving.md; no test here measures time or RSS.

Prompts come from a seeded generator; the seed is printed and can be set with MEMORY_SEED.
"""

from __future__ import annotations

import os
import random
import threading

import numpy as np
import pytest

pytest.importorskip("torch")

import portable_infer  # noqa: E402
from _serving import EngineSpy  # noqa: E402
from portable_infer.engine import memory  # noqa: E402
from portable_infer.errors import InvalidArgumentError  # noqa: E402
from portable_infer.decode.generate import DEFAULT_BATCH_TOKENS, plan_batches  # noqa: E402
from portable_infer.model import Model  # noqa: E402
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig  # noqa: E402

SEED = int(os.environ.get("MEMORY_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[MEMORY_SEED={SEED}]"
SHRINK = "memory.enable_memory_arena_shrinkage"


@pytest.fixture(scope="module")
def fused(tiny_llama):
    print(TAG)
    return portable_infer.load(tiny_llama.package, "cpu", static_kv=False, intra_op_threads=2)


@pytest.fixture(scope="module")
def static(tiny_llama):
    return portable_infer.load(tiny_llama.package, "cpu", static_kv=True, intra_op_threads=2)


def make_prompts(offset: int, lengths) -> list:
    rng = np.random.default_rng(SEED + offset)
    return [rng.integers(3, 256, int(n)).tolist() for n in lengths]


def with_engine(model, engine) -> Model:
    return Model(model.manifest, engine, model.codec, model.path, model.selection)


# --- sub-batches ---------------------------------------------------------------------------------
def test_plan_batches_hand_computed():
    assert plan_batches([5, 1, 9], 3, 100, 16) == [[1, 0], [2]]  # 2 x (5 + 3) = 16; 9 + 3 alone
    assert plan_batches([4, 4, 4, 4], 0, 100, 8) == [[0, 1], [2, 3]]  # ties keep their order
    assert plan_batches([50], 10, 100, 8) == [[0]]  # over the budget alone: still runs, alone
    assert plan_batches([90, 95], 20, 100, 200) == [[0, 1]]  # widths capped at the context: 2 x 100
    assert plan_batches([3, 2, 1], 1, 100, 10**6) == [[0, 1, 2]]  # one batch: rows in their order


def test_batches_split_by_the_token_budget_and_equal_one_by_one_runs(fused):
    """60 prompts of 1-200 tokens: one padded batch would hold 60 x 204 KV tokens."""
    lengths = np.random.default_rng(SEED).integers(1, 201, 60)
    prompts = make_prompts(1, lengths)
    prefills = []

    def before(ids, mask, cache, *_):
        if cache.length == 0:  # the first forward of a sub-batch: its prefill
            prefills.append(ids.shape)

    spied = with_engine(fused, EngineSpy(fused.engine, before))
    ref = [fused.generate_ids(p, max_new_tokens=4, ignore_eos=True) for p in prompts]
    out = spied.batch_generate_ids(prompts, max_new_tokens=4, ignore_eos=True)
    assert out == ref, f"{TAG} sub-batched outputs differ from one-by-one runs"
    assert len(prefills) > 1, f"{TAG} one batch for everything: {prefills}"
    assert all(b * (s + 4) <= DEFAULT_BATCH_TOKENS for b, s in prefills), f"{TAG} {prefills}"
    assert sum(b for b, _ in prefills) == len(prompts)

    prefills.clear()
    small = spied.batch_generate_ids(prompts[:12], max_new_tokens=4, ignore_eos=True, max_batch_tokens=300)
    assert small == ref[:12] and all(b == 1 or b * (s + 4) <= 300 for b, s in prefills), f"{TAG} {prefills}"


def test_sampled_and_text_results_do_not_depend_on_the_split(tiny_text_package):
    """Each row has its own seeded generator, so even sampled text is the one-by-one text."""
    model = portable_infer.load(tiny_text_package, "cpu", static_kv=False, intra_op_threads=2)
    rng = np.random.default_rng(SEED + 2)
    prompts = ["".join(chr(c) for c in rng.integers(97, 123, int(n))) for n in rng.integers(1, 40, 9)]
    kw = dict(max_new_tokens=6, ignore_eos=True, temperature=0.9, top_p=0.95, seed=11)
    ref = [model.generate(p, **kw) for p in prompts]
    assert model.batch_generate(prompts, max_batch_tokens=60, **kw) == ref, TAG
    assert model.batch_generate(prompts, **kw) == ref, TAG


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "8192"])
def test_max_batch_tokens_is_checked(fused, value):
    with pytest.raises(InvalidArgumentError, match="max_batch_tokens must be an int >= 1") as err:
        fused.batch_generate_ids([[5, 6]], max_batch_tokens=value)
    assert err.value.param == "max_batch_tokens"


# --- arena shrinkage -----------------------------------------------------------------------------
class RecordingSession:
    """The real session; records the arena-shrink option of every run."""

    def __init__(self, session):
        self.session, self.runs = session, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run_with_iobinding(self, binding, run_options=None):
        try:
            self.runs.append(run_options.get_run_config_entry(SHRINK) if run_options is not None else None)
        except RuntimeError:  # RunOptions without that key
            self.runs.append(None)
        return self.session.run_with_iobinding(binding, run_options)


@pytest.mark.parametrize("kind", ["fused", "static"])
def test_large_prefills_shrink_the_arena_and_decode_steps_do_not(fused, static, monkeypatch, kind):
    model = fused if kind == "fused" else static
    rec = RecordingSession(model.engine.session)
    monkeypatch.setattr(model.engine, "session", rec)
    long, short = make_prompts(3, (memory.SHRINK_MIN_TOKENS + 10, 5))
    model.generate_ids(long, max_new_tokens=3, ignore_eos=True)
    model.generate_ids(short, max_new_tokens=2, ignore_eos=True)
    assert rec.runs == ["cpu:0", None, None, None, None], f"{TAG} {rec.runs}"


def test_a_dropped_large_cache_is_given_back_after_the_generation(fused, monkeypatch):
    rec = RecordingSession(fused.engine.session)
    monkeypatch.setattr(fused.engine, "session", rec)
    monkeypatch.setattr(memory, "TRIM_MIN_BYTES", 1)  # the tiny model's KV counts as large
    fused.generate_ids(make_prompts(4, (6,))[0], max_new_tokens=3, ignore_eos=True)
    assert rec.runs == [None, None, None, "cpu:0"], f"{TAG} {rec.runs}"  # 3 forwards, then the trim run


def test_without_an_arena_nothing_asks_for_shrinkage(tiny_llama):
    model = portable_infer.load(tiny_llama.package, "cpu", static_kv=False, low_memory=True, intra_op_threads=2)
    rec = RecordingSession(model.engine.session)
    model.engine.session = rec
    out = model.generate_ids(make_prompts(5, (memory.SHRINK_MIN_TOKENS + 1,))[0], max_new_tokens=2)
    assert out and rec.runs and set(rec.runs) == {None}, rec.runs


# --- kv_cache_bytes ------------------------------------------------------------------------------
def test_a_static_cache_counts_the_positions_written_not_its_capacity(static):
    engine = static.engine
    cache = engine.new_cache(3, capacity=96)
    per = cache.reserved_nbytes() // (3 * cache.capacity)
    assert cache.nbytes() == 0 and cache.reserved_nbytes() == 3 * 96 * per
    prompts = make_prompts(6, (5, 9, 3))
    ids, mask = np.zeros((3, 9), np.int64), np.zeros((3, 9), np.int64)
    for i, p in enumerate(prompts):
        ids[i, 9 - len(p):], mask[i, 9 - len(p):] = p, 1
    engine.forward(ids, mask, cache)
    assert cache.nbytes() == 3 * 9 * per, TAG  # a prefill writes all 9 positions of every row
    mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
    engine.forward(np.full((3, 1), 7, np.int64), mask, cache)
    assert cache.nbytes() == (9 + 10 + 9) * per, TAG  # rows now hold 6, 10, 4 tokens


def test_the_schedulers_kv_bytes_are_what_the_batch_holds(static):
    """kv_cache_bytes once reported the static buffers' virtual size (2,824 MiB for 41 MB of RSS)."""
    prompt = make_prompts(7, (20,))[0]
    seen, paused, resume = [], threading.Event(), threading.Event()

    def before(ids, *_):
        if ids.shape[1] == 1:
            seen.append(1)
            if len(seen) == 4:  # inside the 4th decode step, before it runs
                paused.set()
                assert resume.wait(30)

    with Scheduler(static, SchedulerConfig(max_batch=2)) as sched:
        sched.engine = EngineSpy(sched.engine, before)
        handle = sched.submit(prompt, max_new_tokens=200, ignore_eos=True)
        assert paused.wait(30), TAG
        held, cache = sched.stats().kv_bytes, sched.batch.cache
        resume.set()
        handle.cancel()
    per = cache.reserved_nbytes() // cache.capacity
    assert cache.capacity >= 220 and held == (20 + 3) * per, f"{TAG} {held} bytes, {held / per} tokens"

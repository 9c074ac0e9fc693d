"""The continuous-batching engine on the tiny random llama (fp32, token ids, no tokenizer).

Invariants that need no reference: requests that join and leave a running batch (left padding,
chunked prefill, rows sliced out) produce exactly the greedy tokens of their single runs; KV
blocks are reserved at admission and given back at once; a full queue raises CapacityError.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from portable_infer.errors import (  # noqa: E402
    CapacityError, ContextLengthError, InvalidArgumentError, PortableInferError,
)
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig, SchedulerObserver  # noqa: E402

from _serving import EngineSpy, OnGpu  # noqa: E402

VARIANTS = ("portable", "fused")
TIMEOUT_S = 30  # every wait in this file is bounded


@pytest.fixture(scope="module", params=VARIANTS)
def model(request, tiny_llama, load_variant):
    return load_variant(tiny_llama.package, request.param)


@pytest.fixture(scope="module")
def fused(tiny_llama, load_variant):
    return load_variant(tiny_llama.package, "fused")


def prompt(rng, n: int) -> list:
    return rng.integers(3, 256, n).tolist()  # never pad, bos or eos


def tokens(handle) -> list:
    out = []
    deadline = time.monotonic() + TIMEOUT_S
    for r in handle:
        if r.token is not None:
            out.append(r.token)
        assert time.monotonic() < deadline, "request did not finish in time"
    return out


def wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


class RunningAtJoin(SchedulerObserver):
    """Records how many rows were running when each request produced its first token."""

    def __init__(self):
        self.scheduler = None
        self.running = []

    def first_token(self, ttft_s):
        self.running.append(self.scheduler.stats().running)


def test_join_and_leave_mid_flight_equals_single_runs(model):
    rng = np.random.default_rng(7)
    # lengths chosen so newcomers are both shorter and longer than the batch, and the long
    # prompt needs several prefill chunks
    lengths, news = (5, 17, 60, 3, 33, 9), (60, 12, 20, 25, 8, 30)
    prompts = [prompt(rng, n) for n in lengths]
    ref = [model.generate_ids(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts, news)]
    obs = RunningAtJoin()
    with Scheduler(model, SchedulerConfig(max_batch=4, prefill_chunk=8), observer=obs) as sched:
        obs.scheduler = sched
        first = sched.submit(prompts[0], max_new_tokens=news[0], ignore_eos=True)
        head = [first.get(TIMEOUT_S).token for _ in range(3)]  # running before the others come
        handles = [sched.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts[1:], news[1:])]
        outs = [head + tokens(first)] + [tokens(h) for h in handles]
        stats = sched.stats()
    for i, (got, want) in enumerate(zip(outs, ref)):
        assert got == want, f"request {i} (prompt {lengths[i]} tokens) differs from its single run"
    assert max(obs.running) >= 2, f"requests never joined a running batch: {obs.running}"
    assert stats.requests_finished == len(prompts) and stats.blocks_used == 0 and stats.running == 0
    assert stats.prompt_tokens == sum(lengths) and stats.generation_tokens == sum(news)
    assert all(s.ttft_s is not None and len(s.inter_token_s) == s.generation_tokens - 1 for s in stats.recent)


def test_each_request_samples_with_its_own_params(fused):
    rng = np.random.default_rng(3)
    prompts = [prompt(rng, n) for n in (4, 11, 7)]
    kws = [dict(temperature=0.9, top_p=0.9, seed=5), dict(temperature=0.0, repetition_penalty=1.5),
           dict(temperature=1.2, top_k=20, seed=9, presence_penalty=0.5)]
    ref = [fused.generate_ids(p, max_new_tokens=15, ignore_eos=True, **kw) for p, kw in zip(prompts, kws)]
    with Scheduler(fused, SchedulerConfig(max_batch=3)) as sched:
        handles = [sched.submit(p, max_new_tokens=15, ignore_eos=True, **kw) for p, kw in zip(prompts, kws)]
        assert [tokens(h) for h in handles] == ref


def test_rows_stop_at_the_context_end_like_single_runs(tiny_llama, load_variant):
    short = load_variant(tiny_llama.short_package, "fused")  # max_context 16
    rng = np.random.default_rng(4)
    prompts = [prompt(rng, n) for n in (3, 9, 14)]
    ref = [short.generate_ids(p, max_new_tokens=50, ignore_eos=True) for p in prompts]
    with Scheduler(short, SchedulerConfig(max_batch=3, prefill_chunk=4)) as sched:
        handles = [sched.submit(p, max_new_tokens=50, ignore_eos=True) for p in prompts]
        outs = [tokens(h) for h in handles]
    assert outs == ref and [len(p) + len(o) for p, o in zip(prompts, outs)] == [16, 16, 16]
    assert [h.stats.finish_reason for h in handles] == ["length"] * 3


def test_budget_full_waits_then_admits_when_blocks_free(fused):
    rng = np.random.default_rng(11)
    # 10 + 200 tokens = 14 blocks of 16: the whole budget
    with Scheduler(fused, SchedulerConfig(kv_budget_tokens=14 * 16, max_batch=4)) as sched:
        a = sched.submit(prompt(rng, 10), max_new_tokens=200, ignore_eos=True)
        b = sched.submit(prompt(rng, 4), max_new_tokens=4, ignore_eos=True)
        s = sched.stats()
        assert (s.waiting, s.blocks_used, s.blocks_total) == (1, 14, 14)
        assert len(tokens(a)) == 200
        assert len(tokens(b)) == 4  # admitted once a's blocks came back
        s = sched.stats()
        assert (s.waiting, s.blocks_used, s.requests_finished) == (0, 0, 2)


def test_cancel_frees_slot_and_blocks_at_once(fused):
    rng = np.random.default_rng(12)
    with Scheduler(fused, SchedulerConfig(kv_budget_tokens=14 * 16, max_batch=4)) as sched:
        a = sched.submit(prompt(rng, 10), max_new_tokens=200, ignore_eos=True)
        a.get(TIMEOUT_S)  # a is running
        b = sched.submit(prompt(rng, 4), max_new_tokens=4, ignore_eos=True)
        assert sched.stats().waiting == 1
        a.cancel()
        s = sched.stats()  # no step in between: the blocks are back and b is admitted
        assert (s.waiting, s.blocks_used) == (0, 1)
        assert s.requests_cancelled == 1
        assert [r.finish_reason for r in a][-1] == "cancelled"
        assert a.stats.finish_reason == "cancelled"
        assert len(tokens(b)) == 4
        a.cancel()  # idempotent
        wait_for(lambda: sched.stats().running == 0, "the cancelled row to leave the batch")
        assert sched.stats().blocks_used == 0


def test_queue_full_raises_capacity_error(fused):
    rng = np.random.default_rng(13)
    with Scheduler(fused, SchedulerConfig(max_batch=1, max_waiting=1)) as sched:
        a = sched.submit(prompt(rng, 5), max_new_tokens=200, ignore_eos=True)
        b = sched.submit(prompt(rng, 5), max_new_tokens=200, ignore_eos=True)
        with pytest.raises(CapacityError) as err:
            sched.submit(prompt(rng, 5), max_new_tokens=4)
        assert err.value.retry_after >= 1
        s = sched.stats()
        assert (s.waiting, s.requests_rejected) == (1, 1)
        b.cancel()
        a.cancel()
        assert sched.stats().blocks_used == 0
        assert len(tokens(sched.submit(prompt(rng, 5), max_new_tokens=3, ignore_eos=True))) == 3


def test_requests_that_can_never_fit_are_refused(fused):
    with Scheduler(fused, SchedulerConfig(kv_budget_tokens=32)) as sched:
        with pytest.raises(ContextLengthError, match="KV blocks") as err:
            sched.submit([5] * 10, max_new_tokens=100)
        assert err.value.param == "max_new_tokens"  # what to lower, for the server's 400
        with pytest.raises(ContextLengthError, match="context"):
            sched.submit([5] * 300, max_new_tokens=1)
        with pytest.raises(InvalidArgumentError, match="top_p"):
            sched.submit([5], top_p=2.0)
    with pytest.raises(InvalidArgumentError, match="max_batch"):
        SchedulerConfig(max_batch=0)


def test_threads_submit_concurrently(fused):
    rng = np.random.default_rng(21)
    prompts = [prompt(rng, int(n)) for n in rng.integers(2, 40, 12)]
    news = [int(n) for n in rng.integers(1, 20, 12)]
    ref = [fused.generate_ids(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts, news)]
    outs, errors = [None] * len(prompts), []
    with Scheduler(fused, SchedulerConfig(max_batch=4, prefill_chunk=16)) as sched:
        def worker(k):
            try:
                for i in range(k, len(prompts), 4):
                    outs[i] = tokens(sched.submit(prompts[i], max_new_tokens=news[i], ignore_eos=True))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT_S)
        assert not errors and outs == ref
        assert sched.stats().blocks_used == 0


def test_async_iteration(fused):
    rng = np.random.default_rng(5)
    prompts = [prompt(rng, n) for n in (6, 13)]
    ref = [fused.generate_ids(p, max_new_tokens=10, ignore_eos=True) for p in prompts]

    async def collect(sched, p):
        return [r.token async for r in sched.submit(p, max_new_tokens=10, ignore_eos=True)]

    async def main(sched):
        return await asyncio.wait_for(asyncio.gather(*(collect(sched, p) for p in prompts)), TIMEOUT_S)

    with Scheduler(fused) as sched:
        assert asyncio.run(main(sched)) == ref


def test_closed_scheduler_refuses_and_ends_streams(fused):
    sched = Scheduler(fused, SchedulerConfig(max_batch=1))
    running = sched.submit([5, 6, 7], max_new_tokens=250, ignore_eos=True)
    waiting = sched.submit([8, 9], max_new_tokens=250, ignore_eos=True)
    sched.close()
    with pytest.raises(PortableInferError, match="closed"):
        sched.submit([5], max_new_tokens=2)
    for h in (running, waiting):
        with pytest.raises(PortableInferError, match="closed"):
            tokens(h)
    s = sched.stats()
    assert (s.waiting, s.blocks_used, s.requests_failed) == (0, 0, 2)


def test_waiting_prompts_are_prefilled_together_and_equal_single_runs(fused):
    """Prompts that queue up while the engine is busy go through one left-padded prefill (one
    forward for all of them) and still give exactly their single runs' greedy tokens."""
    rng = np.random.default_rng(11)
    prompts = [prompt(rng, n) for n in (9, 4, 14, 6, 11)]
    ref = [fused.generate_ids(p, max_new_tokens=12, ignore_eos=True) for p in prompts]
    gate, groups = threading.Event(), []

    with Scheduler(fused, SchedulerConfig(max_batch=8, prefill_chunk=64)) as sched:
        sched.engine = EngineSpy(sched.engine, lambda *_: gate.wait(TIMEOUT_S))  # until all are submitted
        real = sched._prefill_group
        sched._prefill_group = lambda group, step: (groups.append(len(group)), real(group, step))
        handles = [sched.submit(p, max_new_tokens=12, ignore_eos=True) for p in prompts]
        wait_for(lambda: sched.stats().prefilling + sched.stats().running == len(prompts), "admission")
        gate.set()
        outs = [tokens(h) for h in handles]
    assert groups and max(groups) >= 3, f"no group prefill happened: {groups}"
    assert outs == ref


def test_a_shared_prompt_prefix_is_prefilled_once_and_outputs_stay_exact(fused):
    """Requests that start like an earlier one (a system prompt) start from its cached KV: they
    prefill only the rest, and still give their single runs' greedy tokens."""
    rng = np.random.default_rng()
    shared = prompt(rng, 37)  # two whole blocks of 16 reusable (plus 5 tokens)
    prompts = [shared + prompt(rng, n) for n in (6, 3, 11)]
    ref = [fused.generate_ids(p, max_new_tokens=8, ignore_eos=True) for p in prompts]
    fed = []
    cfg = SchedulerConfig(max_batch=4, prefill_chunk=256, block_size=16)
    with Scheduler(fused, cfg) as sched:
        sched.engine = EngineSpy(sched.engine, lambda ids, *_: ids.shape[1] > 1 and fed.append(ids.shape[1]))
        outs = [tokens(sched.submit(p, max_new_tokens=8, ignore_eos=True)) for p in prompts]  # one by one
        s = sched.stats()
    assert outs == ref
    assert fed == [len(prompts[0]), len(prompts[1]) - 32, len(prompts[2]) - 32], fed
    assert (s.prefix_cache_hits, s.prefix_cache_tokens) == (2, 64) and s.prefix_cache_bytes > 0
    assert s.prompt_tokens == len(prompts[0]) + len(prompts[1]) + len(prompts[2]) - 64

    with Scheduler(fused, SchedulerConfig(max_batch=4, block_size=16, prefix_cache_bytes=0)) as sched:
        outs = [tokens(sched.submit(p, max_new_tokens=8, ignore_eos=True)) for p in prompts]
        s = sched.stats()
    assert outs == ref and (s.prefix_cache_hits, s.prefix_cache_bytes) == (0, 0)


@pytest.mark.parametrize("min_tokens", [32, 0])
def test_a_short_cached_prefix_is_recomputed_in_a_group_but_reused_alone(fused, min_tokens):
    """Requests that arrive together are prefilled in one forward in full when their cached
    prefix is shorter than ``prefix_min_tokens`` (the default on GPUs), rather than one forward
    each on top of the prefix; ``prefix_min_tokens=0`` (the CPU's default) reuses every hit. A
    request prefilled alone reuses its short prefix either way (stored as part of a prompt of at
    least ``prefix_min_tokens``: shorter prompts are not stored). Greedy tokens equal single runs
    in every case."""
    rng = np.random.default_rng()
    shared = prompt(rng, 20)  # one reusable block of 16
    seed, *burst, alone = [shared + prompt(rng, n) for n in (13, 7, 4, 9, 6)]  # the seed: 33 >= 32 tokens
    ref = [fused.generate_ids(p, max_new_tokens=6, ignore_eos=True) for p in burst + [alone]]
    hold, held, fed = threading.Event(), threading.Event(), []

    def before(ids, *_):  # records prefill shapes; a decode step waits while ``hold`` is set
        if ids.shape[1] > 1:
            fed.append(ids.shape)
        elif hold.is_set():
            held.set()
            wait_for(lambda: not hold.is_set(), "release")

    cfg = SchedulerConfig(max_batch=8, prefill_chunk=64, block_size=16, prefix_min_tokens=min_tokens)
    with Scheduler(fused, cfg) as sched:
        sched.engine = EngineSpy(sched.engine, before)
        tokens(sched.submit(seed, max_new_tokens=2, ignore_eos=True))  # stores the shared block
        hold.set()
        busy = sched.submit(prompt(rng, 4), max_new_tokens=60, ignore_eos=True)
        wait_for(held.is_set, "the loop inside a decode step")
        handles = [sched.submit(p, max_new_tokens=6, ignore_eos=True) for p in burst]
        wait_for(lambda: sched.stats().prefilling == len(burst), "admission")
        fed.clear()
        hold.clear()
        outs = [tokens(h) for h in handles]
        grouped = list(fed)
        tokens(busy)
        fed.clear()
        outs.append(tokens(sched.submit(alone, max_new_tokens=6, ignore_eos=True)))
        s = sched.stats()
    assert outs == ref
    if min_tokens:  # one forward over the whole prompts, then the lone request on its prefix
        assert grouped == [(len(burst), max(map(len, burst)))], grouped
        assert fed == [(1, len(alone) - 16)], fed
        assert (s.prefix_cache_hits, s.prefix_cache_tokens) == (1, 16)
    else:  # every hit reused: one forward per request over the rest of its prompt
        assert sorted(grouped) == sorted((1, len(p) - 16) for p in burst), grouped
        assert (s.prefix_cache_hits, s.prefix_cache_tokens) == (len(burst) + 1, 16 * (len(burst) + 1))


def test_prefix_min_tokens_default_depends_on_the_device_and_is_validated(fused):
    with Scheduler(fused, SchedulerConfig(prefill_chunk=48)) as cpu:
        assert cpu.planner.prefix_min == 0
    with Scheduler(OnGpu(fused), SchedulerConfig(prefill_chunk=48)) as gpu:
        assert gpu.planner.prefix_min == 48
    with Scheduler(OnGpu(fused), SchedulerConfig(prefix_min_tokens=7)) as gpu:
        assert gpu.planner.prefix_min == 7
    with pytest.raises(InvalidArgumentError, match="prefix_min_tokens"):
        SchedulerConfig(prefix_min_tokens=-1)

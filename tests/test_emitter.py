"""The scheduler's emitter thread (``SchedulerConfig.emit_thread``): each step's text made while the
next forward runs. What the readers get must not depend on it: the same pieces, finish reasons,
token counts and stop-string cuts as when the step loop makes the text itself, and every slot and
KV block back at the end. The default: on for GPUs, off on the CPU."""

from __future__ import annotations

import os
import time
import random

import numpy as np
import pytest

pytest.importorskip("torch")

from _serving import OnGpu, add_tokenizer  # noqa: E402
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig  # noqa: E402

SEED = int(os.environ.get("EMITTER_SEED") or random.SystemRandom().randrange(2**31))


@pytest.fixture(scope="module")
def model(tiny_llama, tmp_path_factory, load_variant):
    return load_variant(add_tokenizer(tiny_llama.package, tmp_path_factory.mktemp("emit") / "pkg"), "fused")


def _run(model, emit_thread: bool, requests: list) -> tuple:
    with Scheduler(model, SchedulerConfig(max_batch=4, prefill_chunk=8, emit_thread=emit_thread)) as sched:
        assert (sched.queues.emitter is not None) == emit_thread
        handles = [sched.submit(p, ignore_eos=True, **kw) for p, kw in requests]
        pieces = [[(r.text, r.token, r.finish_reason, r.generation_tokens) for r in h] for h in handles]
        stats = sched.stats()
    return pieces, [h.stats.generation_tokens for h in handles], stats


def test_the_emitter_thread_changes_nothing_the_readers_see(model):
    rng = np.random.default_rng(SEED)
    prompts = [rng.integers(3, 200, n).tolist() for n in (5, 17, 9, 30, 3, 12)]
    news = rng.integers(8, 40, len(prompts)).tolist()
    # a stop string taken from request 1's own text: it ends there, mid-way, in both modes
    text = model.generate(prompts[1], max_new_tokens=news[1], ignore_eos=True)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    requests = [(p, dict(max_new_tokens=n)) for p, n in zip(prompts, news)]
    requests[1] = (prompts[1], dict(max_new_tokens=news[1], stop=[stop]))
    requests[4] = (prompts[4], dict(max_new_tokens=news[4], temperature=0.9, seed=SEED))
    inline, inline_counts, inline_stats = _run(model, False, requests)
    threaded, counts, stats = _run(model, True, requests)
    assert threaded == inline, SEED
    assert counts == inline_counts, SEED
    assert inline[1][-1][2] == "stop" and stop not in "".join(t for t, *_ in inline[1]), (SEED, stop)
    for s in (inline_stats, stats):
        assert s.blocks_used == 0 and s.running == 0 and s.requests_finished == len(requests), (SEED, s)
        assert s.generation_tokens == sum(counts), (SEED, s)


def test_the_emitter_runs_where_forwards_leave_the_cores_free(model):
    with Scheduler(model, SchedulerConfig()) as cpu:
        assert cpu.queues.emitter is None
    with Scheduler(OnGpu(model), SchedulerConfig()) as gpu:
        assert gpu.queues.emitter is not None
    with Scheduler(OnGpu(model), SchedulerConfig(emit_thread=False)) as gpu:
        assert gpu.queues.emitter is None
    with pytest.raises(Exception, match="emit_thread"):
        SchedulerConfig(emit_thread=1)


def test_a_drain_thread_hands_over_everything_in_order_and_survives_its_handler():
    """Items put while the handler runs come in its next call, in order; a handler's exception
    is logged and the next items still come; close hands over what is left."""
    import threading

    from portable_infer.serving.drain import DrainThread

    calls, gate = [], threading.Event()

    def handle(items):
        if not calls:
            gate.wait(10)  # the first call blocks while more items pile up
        calls.append(list(items))
        if 99 in items:
            raise RuntimeError("a handler bug")

    d = DrainThread(handle, "test-drain")
    for i in range(5):
        d.put(i)
    gate.set()
    d.put(99)
    deadline = time.monotonic() + 10
    while not any(99 in c for c in calls):
        assert time.monotonic() < deadline, calls
        time.sleep(0.001)
    d.put(100)  # after the handler raised
    d.close()
    flat = [x for c in calls for x in c]
    assert flat == [0, 1, 2, 3, 4, 99, 100], calls
    assert len(calls) < len(flat)  # batched: not one call per item

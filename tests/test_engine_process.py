"""The scheduler in a process of its own (``serving/engine_process.py``): what a reader gets is what
the in-process scheduler gives (text, finish reasons, token counts, stop strings, errors with their
type and ``param``), cancel and close give everything back, and a dead engine process ends every open
request with an error instead of leaving it hanging."""

from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from _serving import add_tokenizer  # noqa: E402
import portable_infer  # noqa: E402
from portable_infer.errors import ContextLengthError, InvalidArgumentError, PortableInferError  # noqa: E402
from portable_infer.serving.engine_core import pack_error, unpack_error  # noqa: E402
from portable_infer.serving.engine_process import ProcessScheduler  # noqa: E402
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig  # noqa: E402

SEED = int(os.environ.get("ENGINE_PROCESS_SEED") or random.SystemRandom().randrange(2**31))
CONFIG = SchedulerConfig(max_batch=4, prefill_chunk=8, kv_budget_tokens=64 * 16)
LOAD = {"providers": "cpu", "intra_op_threads": 1}


@pytest.fixture(scope="module")
def package(tiny_llama, tmp_path_factory):
    return add_tokenizer(tiny_llama.package, tmp_path_factory.mktemp("engine") / "pkg")


@pytest.fixture(scope="module")
def remote(package):
    with ProcessScheduler(package, LOAD, CONFIG) as sched:
        yield sched


def _requests(model) -> list:
    rng = np.random.default_rng(SEED)
    prompts = [rng.integers(3, 200, n).tolist() for n in (5, 17, 9, 30)]
    text = model.generate(prompts[1], max_new_tokens=20, ignore_eos=True)
    return [(prompts[0], dict(max_new_tokens=12)),
            (prompts[1], dict(max_new_tokens=20, stop=[text[8:10]])),
            (prompts[2], dict(max_new_tokens=9, temperature=0.8, seed=SEED)),
            (prompts[3], dict(max_new_tokens=15, logprobs=2))]


def _read(sched, requests) -> list:
    handles = [sched.submit(p, ignore_eos=True, **kw) for p, kw in requests]
    return [([(r.text, r.token, r.finish_reason, r.generation_tokens, r.logprob, r.top_logprobs) for r in h],
             h.stats.generation_tokens, h.stats.finish_reason, h.prompt_tokens) for h in handles]


def test_the_engine_process_gives_what_the_in_process_scheduler_gives(package, remote):
    model = portable_infer.load(package, **LOAD)
    requests = _requests(model)
    with Scheduler(model, CONFIG) as local:
        want = _read(local, requests)
    got = _read(remote, requests)
    assert got == want, SEED
    assert want[1][2] == "stop", (SEED, want[1])
    assert remote.model.engine.provider == model.provider and remote.model.max_context == model.max_context
    assert remote.stats().blocks_used == 0 and remote.alive
    # the step loop's clock crosses the pipe (how the requests share steps depends on timing)
    there = remote.stats().steps
    assert there["decode_rows"] >= there["decode_steps"] > 0 and there["decode_forward"] > 0, there


def test_bad_requests_raise_their_own_errors_here(remote):
    with pytest.raises(ContextLengthError) as too_long:
        remote.submit([5] * (remote.max_context + 1), max_new_tokens=4)
    assert too_long.value.param == "prompt", too_long.value.__dict__
    with pytest.raises(InvalidArgumentError):
        remote.submit([5, 6, 7], max_new_tokens=4, constraint={"json_schema": {"type": "nonsense"}})
    with pytest.raises(InvalidArgumentError):
        remote.submit([5, 6, 7], temperature=-1.0)
    assert remote.stats().blocks_used == 0


def test_cancel_gives_the_blocks_back(remote):
    h = remote.submit([5, 6, 7], max_new_tokens=200, ignore_eos=True)
    first = h.get(timeout=60)
    assert first.token is not None
    h.cancel()
    rest = list(h)
    assert rest and rest[-1].finish_reason == "cancelled"
    deadline = time.monotonic() + 30
    while remote.stats().blocks_used:
        assert time.monotonic() < deadline, remote.stats()
        time.sleep(0.01)


def test_a_dead_engine_process_ends_open_requests(package):
    sched = ProcessScheduler(package, LOAD, CONFIG)
    h = sched.submit([5, 6, 7], max_new_tokens=sched.max_context - 3, ignore_eos=True)
    assert h.get(timeout=60).token is not None
    sched._proc.kill()
    with pytest.raises(PortableInferError, match="engine process exited"):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            h.get(timeout=30)
    assert not sched.alive
    with pytest.raises(PortableInferError):
        sched.submit([5, 6, 7], max_new_tokens=4)
    sched.close()


def test_loading_errors_are_raised_by_the_constructor(tmp_path):
    with pytest.raises(PortableInferError, match="does not exist"):
        ProcessScheduler(tmp_path / "missing", LOAD, CONFIG)


def test_errors_cross_with_their_class_and_attributes():
    err = unpack_error(pack_error(InvalidArgumentError("bad top_p", param="top_p")))
    assert type(err) is InvalidArgumentError and err.param == "top_p" and str(err) == "bad top_p"
    odd = unpack_error(("no.such.module", "Thing", "it broke", {}))
    assert type(odd) is PortableInferError and "it broke" in str(odd)


def test_the_server_runs_over_the_engine_process(package, remote):
    """The HTTP app takes a ProcessScheduler as a Scheduler: a streamed chat equals the model's own
    reply, usage counts agree, and the metrics observer sees the engine's requests."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from portable_infer.serving.http import ServerConfig, create_app
    from portable_infer.serving.http.runner import BackgroundServer

    model = portable_infer.load(package, **LOAD)
    messages = [{"role": "user", "content": "Hi there"}]
    want = model.chat(messages, max_new_tokens=10, ignore_eos=True)
    with BackgroundServer(create_app(remote, ServerConfig(model_name="m"))) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=60)
        chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=10, stream=True,
                                                     stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want
        assert chunks[-1].usage.completion_tokens == 10
        metrics = httpx.get(f"{srv.url}/metrics", timeout=30).text
    def value(prefix: str) -> float:  # the stats (an ask) and the observer hooks (forwarded events)
        lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
        assert lines, (prefix, metrics[:2000])
        return float(lines[0].split()[-1])

    assert value('portable_infer_requests_total{outcome="finished"}') >= 1
    assert value("portable_infer_time_to_first_token_seconds_count") >= 1


def test_capacity_is_counted_here_and_a_refusal_there_ends_the_request(package):
    """has_capacity needs no round trip (requests open here against max_batch + max_waiting); a
    request the engine still refuses (its queue full) ends with the CapacityError instead."""
    from portable_infer.errors import CapacityError

    with ProcessScheduler(package, LOAD, SchedulerConfig(max_batch=1, max_waiting=1)) as sched:
        n = sched.max_context - 3
        first = sched.submit([5, 6, 7], max_new_tokens=n, ignore_eos=True)
        assert first.get(timeout=60).token is not None  # running: the slot is taken
        assert sched.has_capacity()
        second = sched.submit([5, 6, 8], max_new_tokens=n, ignore_eos=True)  # waits for the slot
        assert not sched.has_capacity()
        third = sched.submit([5, 6, 9], max_new_tokens=n, ignore_eos=True)  # past the engine's queue
        with pytest.raises(CapacityError):
            list(third)
        for h in (first, second):
            h.cancel()
            assert list(h)[-1].finish_reason == "cancelled"


def test_each_observer_sees_each_event_once_and_a_failing_one_stops_nothing(package):
    from portable_infer.serving.scheduler import SchedulerObserver

    class Count(SchedulerObserver):
        def __init__(self):
            self.firsts, self.ends = 0, 0

        def first_token(self, ttft_s):
            self.firsts += 1

        def finished(self, stats):
            self.ends += 1

    class Broken(SchedulerObserver):
        def first_token(self, ttft_s):
            raise RuntimeError("a broken metrics hook")

    a, b = Count(), Count()
    with ProcessScheduler(package, LOAD, CONFIG) as sched:
        for o in (a, Broken(), b):
            sched.add_observer(o)
        handles = [sched.submit([5, 6, k], max_new_tokens=4, ignore_eos=True) for k in (7, 8, 9)]
        assert [list(h)[-1].finish_reason for h in handles] == ["length"] * 3
        deadline = time.monotonic() + 30
        while (a.ends, b.ends) != (3, 3):
            assert time.monotonic() < deadline, (a.__dict__, b.__dict__)
            time.sleep(0.01)
    assert (a.firsts, b.firsts) == (3, 3)


def test_the_engine_process_switches_threads_often_only_on_a_device(remote):
    """On a device the step loop must not wait for the GIL behind its own helper threads (engine_core's
    measurement): the engine process shortens the switch interval there; a CPU engine keeps Python's."""
    from portable_infer.serving import engine_core

    assert engine_core.switch_interval("cuda") == engine_core.DEVICE_SWITCH_INTERVAL_S < 0.001
    assert engine_core.switch_interval("cpu") is None
    assert remote.switch_interval_s == 0.005  # this CPU engine's process (spawned): Python's own


def test_serve_splits_the_processes_by_default_only_where_tensors_live_on_a_device(monkeypatch):
    """``serve --engine-process auto`` (the default): the first provider the request would try that this
    ONNX Runtime offers decides; a bare ``--engine-process`` is "on"."""
    from portable_infer.cli import build_parser
    from portable_infer.serving.engine_process import splits

    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    splits_by_default = lambda providers, available=None: splits("auto", providers, available)  # noqa: E731
    assert splits("on", "cpu") and not splits("off", "cuda", gpu)
    assert splits_by_default("cuda", gpu) and splits_by_default("auto", gpu)
    assert not splits_by_default("cpu", gpu)  # asked for the CPU on a GPU host
    assert not splits_by_default("cuda,cpu", ["CPUExecutionProvider"])  # CUDA not offered: the CPU runs
    assert not splits_by_default("auto", ["CPUExecutionProvider"])
    from portable_infer.engine import providers

    for offered, split in ((["CPUExecutionProvider"], False), (gpu, True)):  # the installed build's list by default
        monkeypatch.setattr(providers, "default_ort", lambda o=offered: type("Ort", (), {
            "__version__": "1.32.0", "get_available_providers": staticmethod(lambda: o)}))
        assert splits_by_default("auto") is split, offered
    parse = lambda *a: build_parser().parse_args(["serve", *a]).engine_process  # noqa: E731
    assert (parse(), parse("--engine-process"), parse("--engine-process", "off")) == ("auto", "on", "off")

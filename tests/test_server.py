"""The OpenAI-compatible server on loopback, driven by the ``openai`` client.

uvicorn runs on a thread on a free 127.0.0.1 port, serving the tiny llama with a character-level
tokenizer. Its engine sleeps a few ms per step so that streams last long enough to interrupt.
Every wait is bounded.
"""

from __future__ import annotations

import re
import sys
import time

import pytest

pytest.importorskip("torch")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import portable_infer  # noqa: E402
from _serving import SlowEngine, add_tokenizer, with_engine  # noqa: E402
from portable_infer.errors import DependencyError  # noqa: E402
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from portable_infer.serving.http import ServerConfig, create_app, require_serve  # noqa: E402
from portable_infer.serving.http.runner import BackgroundServer  # noqa: E402

KEY = "test-key-123"
NAME = "tiny"
STEP_DELAY_S = 0.004
TIMEOUT_S = 30
LONG = dict(max_tokens=200, extra_body={"ignore_eos": True})  # >= 0.8 s at STEP_DELAY_S


@pytest.fixture(scope="module")
def chat_package(tiny_llama, tmp_path_factory):
    return add_tokenizer(tiny_llama.package, tmp_path_factory.mktemp("serve") / "pkg")


@pytest.fixture(scope="module")
def model(chat_package):
    return portable_infer.load(chat_package, "cpu", intra_op_threads=2)


@pytest.fixture(scope="module")
def server(model):
    slow = with_engine(model, SlowEngine(model.engine, STEP_DELAY_S))
    scheduler = Scheduler(slow, SchedulerConfig(max_batch=2, max_waiting=1, prefill_chunk=16))
    config = ServerConfig(api_key=KEY, model_name=NAME, max_prompt_tokens=100, max_new_tokens=220,
                          max_body_bytes=4096)
    with BackgroundServer(create_app(scheduler, config)) as srv:
        srv.scheduler = scheduler
        yield srv
    scheduler.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture(autouse=True)
def idle(server):
    """Each test starts and ends with nothing running (a leak fails the test that caused it)."""
    wait_idle(server)
    yield
    wait_idle(server)


def wait_idle(server):
    deadline = time.monotonic() + TIMEOUT_S
    while (s := server.scheduler.stats()).running + s.prefilling + s.waiting or s.blocks_used:
        assert time.monotonic() < deadline, f"the server did not become idle: {s}"
        time.sleep(0.01)


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT_S).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def assert_openai_error(response, status: int, code: str | None = None):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code


# --- happy paths --------------------------------------------------------------------------------
def test_models(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion(client, model):
    want = model.generate("Hello world", max_new_tokens=12, ignore_eos=True)
    r = client.completions.create(model=NAME, prompt="Hello world", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].text == want
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(model.encode("Hello world")), 12)


def test_completion_streaming(client, model):
    want = model.generate("Hello world", max_new_tokens=12, ignore_eos=True)
    chunks = list(client.completions.create(model=NAME, prompt="Hello world", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 12


def test_completion_token_ids_and_stop_string(client, model):
    full = model.generate([5, 6, 7], max_new_tokens=30, ignore_eos=True)
    stop = full[5:7]
    r = client.completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=30, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]


def test_chat(client, model):
    messages = [{"role": "user", "content": "Hi there"}]
    want = model.chat(messages, max_new_tokens=10, ignore_eos=True)
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want and r.usage.completion_tokens == 10


def test_chat_streaming(client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    want = model.chat(messages, max_new_tokens=10, ignore_eos=True)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=10,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_raw_sse_format(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "abc", "max_tokens": 3, "stream": True}, timeout=TIMEOUT_S) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


# --- capacity, cancellation, metrics ------------------------------------------------------------
def test_disconnect_cancels_and_frees_capacity(client, server):
    cancelled = metric(server, "portable_infer_requests_total", '{outcome="cancelled"}')
    stream = client.completions.create(model=NAME, prompt="Tell me a long story", stream=True, **LONG)
    pieces = [next(iter(stream)) for _ in range(3)]
    assert len(pieces) == 3 and metric(server, "portable_infer_requests_running") == 1
    assert metric(server, "portable_infer_kv_blocks_used") > 0
    stream.close()  # the client goes away mid-stream
    wait_idle(server)
    assert metric(server, "portable_infer_requests_total", '{outcome="cancelled"}') == cancelled + 1
    assert metric(server, "portable_infer_requests_running") == 0
    assert metric(server, "portable_infer_kv_blocks_used") == 0
    last = server.scheduler.stats().recent[-1]
    assert last.finish_reason == "cancelled" and last.generation_tokens < 200


def test_overload_gives_429_then_recovers(client, server):
    # max_batch 2 + max_waiting 1: three long streams fill it
    streams = [client.completions.create(model=NAME, prompt=f"story {i}", stream=True, **LONG) for i in range(3)]
    try:
        assert metric(server, "portable_infer_requests_waiting") == 1
        assert httpx.get(f"{server.url}/ready", timeout=TIMEOUT_S).status_code == 503
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model=NAME, prompt="one more", max_tokens=5)
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert err.value.body["code"] == "server_overloaded"
    finally:
        for s in streams:
            s.close()
    wait_idle(server)
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT_S).status_code == 200
    assert httpx.get(f"{server.url}/ready", timeout=TIMEOUT_S).status_code == 200
    assert client.completions.create(model=NAME, prompt="after", max_tokens=3).choices[0].text is not None
    assert metric(server, "portable_infer_requests_total", '{outcome="rejected"}') >= 1
    assert metric(server, "portable_infer_http_responses_total", '{path="/v1/completions",status="429"}') >= 1


def test_metrics_after_traffic(client, server):
    client.completions.create(model=NAME, prompt="count me", max_tokens=4, extra_body={"ignore_eos": True})
    assert metric(server, "portable_infer_generation_tokens_total") >= 4
    assert metric(server, "portable_infer_prompt_tokens_total") >= len("count me")
    assert metric(server, "portable_infer_time_to_first_token_seconds_count") >= 1
    assert metric(server, "portable_infer_inter_token_latency_seconds_count") >= 3
    assert metric(server, "portable_infer_kv_blocks_total") > 0
    assert metric(server, "portable_infer_tokens_per_second") >= 0
    assert metric(server, "portable_infer_requests_preempted_total") == 0  # whole reservations here (no paged KV)
    system = "You are a careful assistant. Answer briefly, never invent facts. "  # ~1 token a char here
    before = metric(server, "portable_infer_prefix_cache_hits_total")
    for question in ("Why is the sky blue?", "What is two plus two?"):
        client.completions.create(model=NAME, prompt=system + question, max_tokens=2)
    assert metric(server, "portable_infer_prefix_cache_hits_total") >= before + 1  # the second reused the first
    assert metric(server, "portable_infer_prefix_cache_tokens_total") >= 16


def test_step_clock_metrics(client, server):
    """The step loop's clock: a request of 6 tokens ignoring EOS is one prefill step (its first
    token) and 5 decode steps of one row; the seconds only grow, forwards took some, and all the
    loop's seconds together fit in the time it ran."""
    def settled():  # idle, and the last step's clock added (it is counted after its rows are released)
        wait_idle(server)
        while (a := server.scheduler.stats().steps) != (time.sleep(0.05) or server.scheduler.stats().steps):
            pass
        return a

    settled()
    names = [("portable_infer_engine_steps_total", '{phase="prefill"}'),
             ("portable_infer_engine_steps_total", '{phase="decode"}'),
             ("portable_infer_decode_rows_total", ""),
             ("portable_infer_engine_seconds_total", '{part="forward",phase="decode"}'),
             ("portable_infer_engine_seconds_total", '{part="host",phase="decode"}'),
             ("portable_infer_engine_seconds_total", '{part="forward",phase="prefill"}')]
    before = [metric(server, n, lab) for n, lab in names]
    t = time.perf_counter()
    client.completions.create(model=NAME, prompt="tick tock", max_tokens=6, extra_body={"ignore_eos": True})
    steps = settled()
    wall = time.perf_counter() - t
    after = [metric(server, n, lab) for n, lab in names]
    d = [a - b for a, b in zip(after, before)]
    assert d[0] >= 1 and d[1] == 5 and d[2] == 5, d
    assert d[3] > 0 and d[4] > 0 and d[5] > 0, d
    assert sum(d[3:]) < wall, (d, wall)
    assert set(steps) == {"prefill_forward", "prefill_host", "decode_forward", "decode_host", "plan", "idle",
                          "prefill_steps", "decode_steps", "decode_rows", "mixed_steps"}
    assert all(v >= 0 for v in steps.values()), steps


# --- errors --------------------------------------------------------------------------------------
def post(server, path: str, content: bytes, key: str | None = KEY):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=TIMEOUT_S)


def test_bad_json(server):
    assert_openai_error(post(server, "/v1/completions", b'{"prompt": "x", '), 400, "invalid_json")
    assert_openai_error(post(server, "/v1/chat/completions", b'["not", "an", "object"]'), 400)
    assert_openai_error(post(server, "/v1/chat/completions", b'{"messages": "hi"}'), 400)
    assert_openai_error(post(server, "/v1/completions", b'{"prompt": "x", "temperature": -1}'), 400)
    assert_openai_error(post(server, "/v1/completions", b'{"prompt": "x", "n": 3}'), 400)


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


def test_over_long_prompt_and_too_many_tokens(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="x" * 150, max_tokens=2)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="x", max_tokens=1000)
    assert err.value.body["param"] == "max_tokens"
    assert_openai_error(post(server, "/v1/completions", b'{"prompt": "' + b"x" * 5000 + b'"}'), 413)


def test_api_key(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0, timeout=TIMEOUT_S)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=NAME, prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert_openai_error(post(server, "/v1/completions", b'{"prompt": "x"}', key=None), 401, "invalid_api_key")
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT_S).status_code == 200  # probes need no key
    assert_openai_error(httpx.get(f"{server.url}/nowhere", timeout=TIMEOUT_S), 404)


def test_missing_serve_dependency_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(DependencyError, match=r"portable-infer\[serve\]"):
        require_serve()

"""The server never answers a client error with a 5xx or a dropped connection (issue 16, items 4 and 9).

uvicorn on loopback serves the tiny llama (character tokenizer, at most 2 new tokens a request).
Everything goes over ONE keep-alive connection (``http.client``): a response that closes it, or a
server that drops it silently (the old 500 path did: the *next* request got ECONNRESET), fails
the test at that request. Fuzzing: FUZZ_BODIES seeded mutations per endpoint (see
``_fuzz_bodies.py``), each answered below 500 and followed by a valid request on the same
connection; ``/metrics`` must have counted every response. The seed is printed and in every
failure message; set SERVER_FUZZ_SEED to replay or vary it.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
from collections import Counter

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")

import portable_infer  # noqa: E402
from _fuzz_bodies import mutated  # noqa: E402
from _serving import add_tokenizer  # noqa: E402
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from portable_infer.serving.http import ServerConfig, create_app  # noqa: E402
from portable_infer.serving.http import fields
from portable_infer.serving.http import protocol  # noqa: E402
from portable_infer.serving.http.runner import BackgroundServer  # noqa: E402

SEED = int(os.environ.get("SERVER_FUZZ_SEED") or 20261116)
TAG = f"[SERVER_FUZZ_SEED={SEED}]"
FUZZ_BODIES = 2000  # per endpoint
KEY, NAME = "fuzz-key", "tiny"
TIMEOUT_S = 30
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
BASE = {
    "completions": {"model": NAME, "prompt": "Hello there", "max_tokens": 2, "temperature": 0.7, "top_p": 0.9,
                    "top_k": 20, "seed": 11, "stop": ["\n\n"], "stream": False, "user": "fuzz"},
    "chat": {"model": NAME, "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
             "max_completion_tokens": 2, "temperature": 0.5, "seed": 3, "n": 1, "response_format": {"type": "text"}},
}
VALID = {"completions": {"prompt": "ok", "max_tokens": 1}, "chat": {"messages": [{"role": "user", "content": "ok"}],
                                                                   "max_tokens": 1}}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    print(TAG)
    package = add_tokenizer(tiny_llama.package, tmp_path_factory.mktemp("fuzz") / "pkg")
    model = portable_infer.load(package, "cpu", intra_op_threads=1)
    scheduler = Scheduler(model, SchedulerConfig(max_batch=4, max_waiting=8))
    config = ServerConfig(api_key=KEY, model_name=NAME, max_prompt_tokens=64, max_new_tokens=2,
                          max_body_bytes=256 << 10)
    app = create_app(scheduler, config)
    srv = BackgroundServer(app)
    with srv:
        srv.app = app
        yield srv
    scheduler.close()


class Connection:
    """One keep-alive HTTP/1.1 connection; every exchange must leave it open."""

    def __init__(self, server):
        self.conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT_S)
        self.conn.connect()
        self.sock = self.conn.sock
        self.sent = 0

    def exchange(self, method: str, path: str, body: bytes | None = None, what: str = "") -> tuple:
        try:
            self.conn.request(method, path, body=body, headers=HEADERS)
            response = self.conn.getresponse()
            data = response.read()
        except (ConnectionError, http.client.HTTPException) as exc:
            raise AssertionError(f"{TAG} the connection was dropped at request {self.sent} ({what}): {exc!r}") from exc
        self.sent += 1
        assert self.conn.sock is self.sock and not response.will_close, \
            f"{TAG} {method} {path} ({what}) closed the connection: {response.status} {data[:300]!r}"
        return response.status, response.getheader("content-type") or "", data

    def close(self):
        self.conn.close()


@pytest.fixture
def conn(server):
    c = Connection(server)
    yield c
    c.close()


def responses_counted(server, path: str) -> int:
    text = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT_S)
    text.request("GET", "/metrics")
    body = text.getresponse().read().decode()
    text.close()
    return int(sum(float(v) for v in re.findall(
        rf'^portable_infer_http_responses_total{{path="{re.escape(path)}",status="\d+"}} (\S+)$', body, re.M)))


def check_answer(status: int, ctype: str, data: bytes, what: str) -> None:
    assert status < 500, f"{TAG} {what} -> {status} {data[:500]!r}"
    if status >= 400:
        err = json.loads(data)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], f"{TAG} {what}: {err}"
    elif ctype.startswith("text/event-stream"):
        assert data.rstrip().endswith(b"data: [DONE]"), f"{TAG} {what}: the stream did not end: {data[-300:]!r}"
    else:
        assert json.loads(data)["choices"], f"{TAG} {what}: {data[:300]!r}"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_fuzzed_bodies_never_5xx_nor_drop_the_connection(server, conn, endpoint):
    path = fields.ROUTES[endpoint]
    known = sorted({f.name for f in fields.BODY})
    rng = random.Random(f"{SEED}-{endpoint}")
    counted_before = responses_counted(server, path)
    statuses, failures = Counter(), 0
    valid = json.dumps(VALID[endpoint]).encode()
    for i in range(FUZZ_BODIES):
        body = mutated(rng, BASE[endpoint], known)
        what = f"body {i}: {body[:200]!r}"
        status, ctype, data = conn.exchange("POST", path, body, what)
        check_answer(status, ctype, data, what)
        statuses[status] += 1
        if status >= 400:  # a valid request right after a failure works on the same connection
            failures += 1  # every 8th generates (7 ms), the others list the models (2 ms)
            method, target, payload = ("POST", path, valid) if failures % 8 == 1 else ("GET", "/v1/models", None)
            status, ctype, data = conn.exchange(method, target, payload, f"the valid request after {what}")
            assert status == 200, f"{TAG} the valid request after {what} -> {status} {data[:300]!r}"
    print(f"{TAG} {endpoint}: {dict(sorted(statuses.items()))} over {conn.sent} requests on one connection")
    assert statuses[200] >= FUZZ_BODIES // 20 and statuses[400] >= FUZZ_BODIES // 4, f"{TAG} {statuses}"
    posted = FUZZ_BODIES + (failures + 7) // 8
    assert responses_counted(server, path) - counted_before == posted, f"{TAG} /metrics missed responses"


# --- every remaining exception: a JSON 500 on a connection that stays usable, and counted -----------
def test_unexpected_exception_is_json_500_and_keeps_the_connection(server, conn, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(protocol, "parse_completion", broken)
    before = responses_counted(server, "/v1/completions")
    for _ in range(3):
        status, _, data = conn.exchange("POST", "/v1/completions", b'{"prompt": "x"}', "a request hitting a bug")
        err = json.loads(data)["error"]
        assert status == 500 and err["type"] == "server_error" and err["code"] == "internal_error", data
        assert "RuntimeError" in err["message"] and "a bug" not in err["message"]  # no internals leak
        status, _, _ = conn.exchange("GET", "/v1/models", None, "the request after a 500")
        assert status == 200
    assert responses_counted(server, "/v1/completions") - before == 3  # the 500s are in /metrics


def test_unexpected_exception_mid_stream_ends_the_stream_cleanly(server, conn, monkeypatch):
    def failing_chunk(self, *args, **kwargs):  # the headers are out before the first chunk is made
        raise RuntimeError("a bug mid-stream")

    monkeypatch.setattr(protocol.Reply, "chunk", failing_chunk)
    body = json.dumps({"prompt": "Hello", "max_tokens": 2, "stream": True, "ignore_eos": True}).encode()
    status, ctype, data = conn.exchange("POST", "/v1/completions", body, "a stream hitting a bug")
    assert status == 200 and ctype.startswith("text/event-stream")
    events = [line[6:] for line in data.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error", events
    monkeypatch.undo()
    status, _, _ = conn.exchange("POST", "/v1/completions", json.dumps(VALID["completions"]).encode(), "after")
    assert status == 200


# --- the HTTP cases of issue 16, each on the same connection -------------------------------------------
CHAT_PATH, COMPLETIONS_PATH = fields.ROUTES["chat"], fields.ROUTES["completions"]
ISSUE_CASES = [  # (what, path, raw body, status, param): each was a 500 (or a 200/404) before
    ("lone surrogate in prompt", COMPLETIONS_PATH, b'{"prompt": "a\\ud800b", "max_tokens": 1}', 400, "prompt"),
    ("lone surrogate in content", CHAT_PATH, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "messages[0].content"),
    ("lone surrogate in role", CHAT_PATH, b'{"messages": [{"role": "\\udfff", "content": "x"}]}', 400,
     "messages[0].role"),
    ("lone surrogate in model", COMPLETIONS_PATH, b'{"model": "\\ud800", "prompt": "x"}', 400, "model"),
    ("bytes that are not UTF-8", COMPLETIONS_PATH, b'{"prompt": "x\xff"}', 400, "prompt"),
    ("100,000-deep array", COMPLETIONS_PATH, b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("5,000-digit integer", COMPLETIONS_PATH, b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400, "seed"),
    ("NaN", COMPLETIONS_PATH, b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("1e999", COMPLETIONS_PATH, b'{"prompt": "x", "top_p": 1e999}', 400, "top_p"),
    ("model 123", COMPLETIONS_PATH, b'{"model": 123, "prompt": "x"}', 400, "model"),
    ("n true", COMPLETIONS_PATH, b'{"prompt": "x", "n": true}', 400, "n"),
    ("logprobs 0", CHAT_PATH, b'{"messages": [{"role": "user", "content": "x"}], "logprobs": 0}', 400, "logprobs"),
    ("response_format bogus", CHAT_PATH,
     b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "bogus"}}', 400, "response_format"),
    ("an array body", CHAT_PATH, b'["not", "an", "object"]', 400, None),
    ("a declared body over the limit", COMPLETIONS_PATH, b'{"prompt": "' + b"x" * (300 << 10) + b'"}', 413, None),
    ("temperature 1e-300 (greedy)", COMPLETIONS_PATH, b'{"prompt": "x", "max_tokens": 2, "temperature": 1e-300}', 200,
     None),
]


@pytest.mark.parametrize("what,path,raw,status,param", ISSUE_CASES, ids=[c[0] for c in ISSUE_CASES])
def test_issue_cases_over_http(conn, what, path, raw, status, param):
    got, ctype, data = conn.exchange("POST", path, raw, what)
    check_answer(got, ctype, data, what)
    assert got == status, data[:300]
    if status >= 400:
        assert json.loads(data)["error"]["param"] == param
    got, _, _ = conn.exchange("POST", COMPLETIONS_PATH, json.dumps(VALID["completions"]).encode(), "after " + what)
    assert got == 200


def test_a_chunked_body_over_the_limit_is_a_413_and_keeps_the_connection(conn):
    chunks = (b"{\"prompt\": \"" + b"x" * 4096 for _ in range(80))  # 320 KiB, no Content-Length
    conn.conn.request("POST", COMPLETIONS_PATH, body=chunks, headers=HEADERS, encode_chunked=True)
    response = conn.conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    status, _, _ = conn.exchange("POST", COMPLETIONS_PATH, json.dumps(VALID["completions"]).encode(), "after a 413")
    assert status == 200

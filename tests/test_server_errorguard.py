"""The outermost error layer of the server (issue 16, item 4), on fake ASGI apps: no exception
reaches the HTTP server (uvicorn closes the keep-alive connection on one, without telling the
client), whatever the response had sent when it was raised. The HTTP-level tests are in
test_server_fuzz.py."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")

from portable_infer.serving.http.errorguard import ErrorGuard, install  # noqa: E402

START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
SSE_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


def run(app, scope_type: str = "http") -> list:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(ErrorGuard(app)({"type": scope_type, "path": "/v1/completions"}, receive, send))
    return sent


def failing_after(*messages):
    async def app(scope, receive, send):
        for m in messages:
            await send(m)
        raise RuntimeError("a bug")
    return app


def test_before_any_response_it_answers_a_json_500():
    sent = run(failing_after())
    assert sent[0]["status"] == 500 and dict(sent[0]["headers"])[b"content-type"] == b"application/json"
    err = json.loads(sent[1]["body"])["error"]
    assert err["type"] == "server_error" and err["code"] == "internal_error" and "RuntimeError" in err["message"]
    assert not sent[1].get("more_body", False)


def test_after_a_complete_response_it_swallows_the_reraise():
    # what ServerErrorMiddleware does: send the handler's 500, then raise again
    sent = run(failing_after({**START, "status": 500}, {"type": "http.response.body", "body": b"{}"}))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


def test_a_started_event_stream_ends_with_an_error_event_and_done():
    sent = run(failing_after(SSE_START, {"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True}))
    last = sent[-1]
    assert last["type"] == "http.response.body" and not last.get("more_body", False)
    events = [line[6:] for line in last["body"].decode().splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["error"]["type"] == "server_error" and events[1] == "[DONE]"


def test_a_plain_body_cut_halfway_still_raises():
    # nothing can tell the client the body is cut but closing the connection
    with pytest.raises(RuntimeError):
        run(failing_after(START, {"type": "http.response.body", "body": b"{", "more_body": True}))


def test_other_scopes_pass_through():
    with pytest.raises(RuntimeError):
        run(failing_after(), scope_type="lifespan")


def test_install_wraps_outside_fastapis_stack():
    from fastapi import FastAPI

    app, seen = FastAPI(), []

    def outer(inner):
        seen.append(inner)
        return inner

    install(app, outer)
    stack = app.build_middleware_stack()
    assert isinstance(seen[0], ErrorGuard) and stack is seen[0]
    assert type(seen[0].app).__name__ == "ServerErrorMiddleware"

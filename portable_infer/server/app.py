"""The FastAPI application: OpenAI-compatible routes over a running :class:`Scheduler`.

::

    POST /v1/completions        text or token-id prompt        SSE when "stream": true
    POST /v1/chat/completions   messages -> chat template      SSE when "stream": true
    GET  /v1/models             the one served model
    GET  /health                200 while the step loop lives (liveness)
    GET  /ready                 200 when a request would be accepted, else 503 (readiness)
    GET  /metrics               Prometheus text format

``/v1/*`` needs ``Authorization: Bearer KEY`` when a key is configured. A streaming client that
disconnects cancels its request, which gives back its slot and KV blocks at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CapacityError, PortableInferError
from . import protocol
from .metrics import Metrics
from .protocol import APIError, Limits, Reply

logger = logging.getLogger(__name__)


def build_app(scheduler, config) -> FastAPI:
    model = scheduler.model
    served = config.served_name(model)
    limits = Limits(config.max_prompt_tokens or model.max_context - 1,
                    config.max_new_tokens or model.max_context - 1)
    metrics = Metrics(scheduler)
    started = int(time.time())
    app = FastAPI(title="portable-infer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.config = scheduler, metrics, config

    # --- errors, all in OpenAI's shape ----------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", "server_error").body(),
                            status_code=500)

    app.add_middleware(_CountResponses, counter=metrics.http)

    # --- helpers ------------------------------------------------------------------------------
    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), config.api_key.encode())
        if not ok:
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                           param=None, code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        limit = config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def submit(parsed: protocol.ParsedRequest):
        try:
            return scheduler.submit_ids(parsed.prompt_ids, parsed.params)
        except CapacityError as exc:
            retry = max(1, math.ceil(exc.retry_after))
            raise APIError(429, f"{exc}", type="rate_limit_error", code="server_overloaded",
                           headers={"Retry-After": str(retry)}) from exc
        except PortableInferError as exc:
            raise protocol.from_engine_error(exc) from exc

    async def generate(request: Request, parse, chat: bool):
        authorize(request)
        body = await read_json(request)
        protocol.check_model(body, served)
        parsed = parse(body, model, limits)
        handle = submit(parsed)
        reply = Reply(chat, served)
        if parsed.stream:
            return StreamingResponse(sse(handle, reply, parsed.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(cancel_on_disconnect(request, handle))
        try:
            text, last = [], None
            async for r in handle:
                text.append(r.text)
                last = r
        except PortableInferError as exc:
            raise APIError(500, f"generation failed: {exc}", "server_error") from exc
        finally:
            watcher.cancel()
            if not handle.done:
                handle.cancel()
        return reply.full("".join(text), last.finish_reason, handle.prompt_tokens, last.generation_tokens)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, protocol.parse_completion, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, protocol.parse_chat, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        entry = {"id": served, "object": "model", "created": started, "owned_by": "portable-infer",
                 "max_model_len": model.max_context}
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return JSONResponse({"status": "dead"}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not scheduler.has_capacity():
            return JSONResponse({"status": "busy"}, status_code=503)
        return {"status": "ready", "model": served}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics")


class _CountResponses:
    """Pure ASGI middleware counting responses by path and status (it leaves streams alone)."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counter.labels(path, str(message["status"])).inc()
            await send(message)
        await self.app(scope, receive, counting_send)


def _event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse(handle, reply: Reply, include_usage: bool):
    """Server-sent events of one request; cancelling (client gone) cancels the request."""
    try:
        if reply.chat:
            yield _event(reply.chunk(None, None, role=True))
        last = None
        try:
            async for r in handle:
                last = r
                if r.text or r.finish_reason is not None:
                    yield _event(reply.chunk(r.text, r.finish_reason))
        except PortableInferError as exc:
            yield _event(APIError(500, f"generation failed: {exc}", "server_error").body())
            return
        if include_usage and last is not None:
            yield _event(reply.usage_chunk(handle.prompt_tokens, last.generation_tokens))
        yield "data: [DONE]\n\n"
    finally:
        if not handle.done:
            handle.cancel()


async def cancel_on_disconnect(request: Request, handle) -> None:
    """Wait for the client to go away, then cancel ``handle`` (for non-streaming requests)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return

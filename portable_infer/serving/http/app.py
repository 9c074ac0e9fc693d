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

Completions are :mod:`.generation`'s: a request is checked for size and capacity before its
prompt is tokenized, and tokenized on a thread pool (:mod:`.admission`), so the event loop always
answers ``/health`` at once. On
shutdown ``/ready`` turns 503 and requests in flight finish or end with an error
(:mod:`.lifecycle`); connection timeouts and limits are :mod:`.connections`'.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from portable_infer.serving.http import errorguard, jsonbody, protocol
from portable_infer.serving.http.admission import Admission
from portable_infer.serving.http.connections import ConnectionGuard
from portable_infer.serving.http.generation import Generation
from portable_infer.serving.http.lifecycle import Lifecycle
from portable_infer.serving.http.metrics import Metrics
from portable_infer.serving.http.protocol import APIError, Limits
from portable_infer.serving.http.ratelog import RateLimitedLog

logger = logging.getLogger(__name__)


def build_app(scheduler, config) -> FastAPI:
    model = scheduler.model
    served = config.served_name(model)
    limits = Limits(config.max_prompt_tokens or model.max_context - 1,
                    config.max_new_tokens or model.max_context - 1, scheduler.row_limit)
    ratelog = RateLimitedLog(logger)
    lifecycle = Lifecycle(config.shutdown_timeout_s)
    guard = ConnectionGuard(config, ratelog)  # runner.py gives it to uvicorn's protocol
    admission = Admission(scheduler, config, limits.max_prompt_tokens)
    metrics = Metrics(scheduler, lifecycle=lifecycle, connections=guard, admission=admission)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        admission.close()
        ratelog.flush()

    app = FastAPI(title="portable-infer", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.scheduler, app.state.metrics, app.state.config = scheduler, metrics, config
    app.state.lifecycle, app.state.connections = lifecycle, guard

    # --- errors, all in OpenAI's shape ----------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)  # ServerErrorMiddleware's handler: its JSON 500, then errorguard
    async def unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return JSONResponse(errorguard.internal_error(exc).body(), status_code=500)

    # outermost, around ServerErrorMiddleware: the connection survives a 500 and the counter sees it
    errorguard.install(app, lambda inner: _CountResponses(inner, metrics.http))

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

    async def read_json(request: Request) -> dict:  # bounded: size, depth, digits, finite, Unicode
        return await jsonbody.read_request(request, config.max_body_bytes)

    generation = Generation(scheduler, config, served, limits, admission, lifecycle, ratelog, read_json)
    parse_chat = functools.partial(protocol.parse_chat, tool_parser=config.tool_parser)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        return await generation(request, protocol.parse_completion, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        return await generation(request, parse_chat, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        entry = {"id": served, "object": "model", "created": started, "owned_by": "portable-infer",
                 "max_model_len": model.max_context}
        return {"object": "list", "data": [entry]}

    _probes(app, scheduler, lifecycle, metrics, served)
    return app


def _probes(app: FastAPI, scheduler, lifecycle: Lifecycle, metrics: Metrics, served: str) -> None:
    """/health (liveness), /ready (readiness: 503 when full or shutting down), /metrics."""

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return JSONResponse({"status": "dead"}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if lifecycle.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not scheduler.has_capacity():
            return JSONResponse({"status": "busy"}, status_code=503)
        return {"status": "ready", "model": served}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


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

"""The outermost layers of the app: no exception reaches the HTTP server, and every response is counted.

Why: Starlette's ``ServerErrorMiddleware`` answers an unhandled exception with a 500 (the app's
JSON handler) and then *re-raises* it, "so servers can log it". uvicorn, seeing an exception after
the response started, closes the transport, without having sent ``Connection: close``: the
client's next request on that pooled keep-alive connection fails with ECONNRESET. And a counting
middleware added with ``add_middleware`` sits inside ``ServerErrorMiddleware``, so it never saw
those 500s. :func:`install` wraps the whole stack FastAPI builds instead::

    outer layers, e.g. the response counter (sees every status, 500s included)
      └ ErrorGuard: an exception after a complete response is swallowed (it was answered and
          │         logged); before any response, it answers a JSON 500 itself; in a started
          │         event stream, it ends the stream with an error event and [DONE]
          └ ServerErrorMiddleware ─ ... ─ routes          (FastAPI's stack)

Only a plain (non-stream) body that fails halfway still closes the connection: nothing else can
tell the client that the body it got is cut.
"""

from __future__ import annotations

import json
import logging

from portable_infer.serving.http.apierror import APIError

logger = logging.getLogger(__name__)


def install(app, *outer) -> None:
    """Wrap ``app``'s middleware stack in :class:`ErrorGuard`, then in each of ``outer`` (callables
    ``inner_asgi_app -> asgi_app``, innermost first). Call before the app serves a request."""
    build = app.build_middleware_stack

    def build_guarded():
        stack = ErrorGuard(build())
        for wrap in outer:
            stack = wrap(stack)
        return stack

    app.build_middleware_stack = build_guarded


def internal_error(exc: BaseException) -> APIError:
    """The 500 of an unexpected exception: its type only (the traceback goes to the log)."""
    return APIError(500, f"internal error: {type(exc).__name__}; the server logged the details", "server_error",
                    code="internal_error")


class ErrorGuard:
    """Pure ASGI middleware that lets no ``Exception`` out of an HTTP request (see the module doc)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = {"started": False, "complete": False, "stream": False}

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                seen["started"] = True
                seen["stream"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                     for k, v in message.get("headers", ()))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                seen["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if seen["complete"]:
                return  # ServerErrorMiddleware answered (its handler logged it) and re-raised
            error = internal_error(exc)
            if not seen["started"]:
                logger.error("unexpected error on %s", scope.get("path"), exc_info=exc)
                body = json.dumps(error.body()).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            elif seen["stream"]:
                event = f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()
                await send({"type": "http.response.body", "body": event, "more_body": False})
            else:
                raise

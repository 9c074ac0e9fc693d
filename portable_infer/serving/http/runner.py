"""Running the app: in the foreground (the CLI), or on a background thread (tests, benchmarks).

Both take the app's :class:`ServerConfig` to uvicorn: the connection guard (timeouts, bound on
open connections: :mod:`.connections`) as its HTTP protocol, and a server that drains before it
stops (:mod:`.lifecycle`): on SIGTERM/SIGINT uvicorn only sets ``should_exit``; each 0.1 s tick
then advances the drain, and the listener closes once every request ended or the period ran out.
uvicorn's own ``timeout_graceful_shutdown`` is the last reserve of that period, for stragglers.
A second Ctrl+C forces the exit at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import threading
import time

from portable_infer.serving.http.config import ServerConfig, require_serve
from portable_infer.serving.http.ratelog import loop_exception_handler

logger = logging.getLogger(__name__)


def create_app(scheduler, config: ServerConfig | None = None):
    """The FastAPI app serving ``scheduler``'s model (the caller owns and closes the scheduler).

    Any ASGI server runs it; ``serve`` / ``runner.BackgroundServer`` also apply the config's
    connection timeouts and bound and the graceful shutdown, which live at the uvicorn level."""
    require_serve()
    from portable_infer.serving.http.app import build_app

    return build_app(scheduler, config or ServerConfig())


def serve(scheduler, config: ServerConfig | None = None, *, log_level: str = "info") -> None:
    """Run the app with uvicorn until SIGTERM/SIGINT, drain (``shutdown_timeout_s``, see the module
    doc), then close the scheduler."""
    config = config or ServerConfig()
    require_serve()
    app = create_app(scheduler, config)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: reachable from other machines%s", config.host,
                       "" if config.api_key else " and without an API key")
    try:
        uvicorn_server(app, log_level=log_level, host=config.host, port=config.port).run()
    finally:
        scheduler.close()


def uvicorn_server(app, *, log_level: str = "info", **where):
    """A ``uvicorn.Server`` for an app from :func:`create_app`, with its config's timeouts, connection
    guard and drain; ``where``: uvicorn's ``host``/``port`` (or pass sockets to ``run``)."""
    import uvicorn

    from portable_infer.serving.http.h11guard import guarded_protocol

    config, lifecycle, guard = app.state.config, app.state.lifecycle, app.state.connections
    uv = uvicorn.Config(app, log_level=log_level, access_log=False, http=guarded_protocol(guard),
                        timeout_keep_alive=config.keep_alive_timeout_s,
                        timeout_graceful_shutdown=lifecycle.reserve_s, **where)
    return _draining_server_class()(uv, lifecycle, guard.log)


@functools.cache
def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, draining (``lifecycle.step``) between the signal and the shutdown."""

        def __init__(self, config, lifecycle, log):
            super().__init__(config)
            self.lifecycle, self.log = lifecycle, log

        async def startup(self, sockets=None) -> None:
            # EMFILE on accept() and broken connections: one line per interval, not a traceback each
            asyncio.get_running_loop().set_exception_handler(loop_exception_handler(self.log))
            await super().startup(sockets=sockets)

        async def on_tick(self, counter: int) -> bool:
            stop = await super().on_tick(counter)
            if stop and self.should_exit and not self.force_exit:
                return self.lifecycle.step()
            return stop

    return DrainingServer


class BackgroundServer:
    """uvicorn on a thread, on a free loopback port; a context manager.

    Example::

        with BackgroundServer(create_app(scheduler, config)) as server:
            httpx.get(f"{server.url}/health")
            server.shutdown()    # what SIGTERM does: drain, then stop (the exit waits for it)
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0):
        require_serve()
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (with
        # proto 0 every response waited ~40 ms for the client's delayed ACK)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn_server(app, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="portable-infer-http", daemon=True)
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = app.state.config.shutdown_timeout_s + 10

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        """Begin the graceful shutdown, as SIGTERM does; returns at once."""
        self.server.should_exit = True

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.thread.join(self.stop_timeout_s)
        self.sock.close()

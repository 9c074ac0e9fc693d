"""Running the app: in the foreground (the CLI), or on a background thread (tests, benchmarks)."""

from __future__ import annotations

import logging
import socket
import threading
import time

from . import ServerConfig, create_app, require_serve

logger = logging.getLogger(__name__)


def run(scheduler, config: ServerConfig, *, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; the scheduler is closed afterwards."""
    require_serve()
    import uvicorn

    app = create_app(scheduler, config)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: reachable from other machines%s", config.host,
                       "" if config.api_key else " and without an API key")
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, timeout_graceful_shutdown=5,
                    access_log=False)
    finally:
        scheduler.close()


class BackgroundServer:
    """uvicorn on a thread, on a free loopback port; a context manager.

    Example::

        with BackgroundServer(create_app(scheduler, config)) as server:
            httpx.get(f"{server.url}/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0):
        require_serve()
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="portable-infer-http", daemon=True)
        self.start_timeout_s = start_timeout_s

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

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

"""OpenAI-compatible HTTP server over the continuous-batching scheduler.

Needs the ``serve`` extra (``pip install "portable-infer[serve]"``: FastAPI, uvicorn,
prometheus-client); importing this package does not import them, :func:`create_app` does.

Example::

    from portable_infer import load
    from portable_infer.serving.scheduler import Scheduler, SchedulerConfig
    from portable_infer.serving.http import ServerConfig, create_app

    scheduler = Scheduler(load(), SchedulerConfig(max_batch=16))
    app = create_app(scheduler, ServerConfig(api_key="secret"))   # any ASGI server runs it
"""

from portable_infer.serving.http.config import SERVE_MODULES, ServerConfig, require_serve
from portable_infer.serving.http.runner import create_app, serve

__all__ = ["SERVE_MODULES", "ServerConfig", "create_app", "require_serve", "serve"]

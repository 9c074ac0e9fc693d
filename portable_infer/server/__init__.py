"""OpenAI-compatible HTTP server over the continuous-batching scheduler.

Needs the ``serve`` extra (``pip install "portable-infer[serve]"``: FastAPI, uvicorn,
prometheus-client); importing this package does not import them, :func:`create_app` does.

Example::

    from portable_infer import load
    from portable_infer.scheduler import Scheduler, SchedulerConfig
    from portable_infer.server import ServerConfig, create_app

    scheduler = Scheduler(load(), SchedulerConfig(max_batch=16))
    app = create_app(scheduler, ServerConfig(api_key="secret"))   # any ASGI server runs it
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgumentError, require

SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")


@dataclass(frozen=True)
class ServerConfig:
    """What the HTTP layer allows (validated at construction).

    ``max_prompt_tokens`` / ``max_new_tokens`` default to the model's context; ``model_name``
    defaults to the package directory's name.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    max_body_bytes: int = 1 << 20

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_new_tokens", "max_body_bytes"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise InvalidArgumentError(f"{name} must be an int >= 1, got {v!r}")
        if not (isinstance(self.port, int) and 0 <= self.port < 65536):
            raise InvalidArgumentError(f"port must be in [0, 65535], got {self.port!r}")
        if self.api_key is not None and not self.api_key:
            raise InvalidArgumentError("api_key must not be empty; leave it unset to turn authentication off")

    def served_name(self, model) -> str:
        if self.model_name:
            return self.model_name
        return model.path.name if getattr(model, "path", None) is not None else model.manifest.model.model_type


def require_serve() -> None:
    """Raise DependencyError with the install hint when a serve dependency is missing."""
    for module in SERVE_MODULES:
        require(module, extra="serve")


def create_app(scheduler, config: ServerConfig | None = None):
    """The FastAPI app serving ``scheduler``'s model (the caller owns and closes the scheduler)."""
    require_serve()
    from .app import build_app

    return build_app(scheduler, config or ServerConfig())


def serve(scheduler, config: ServerConfig | None = None, *, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted, then close the scheduler."""
    from .runner import run

    run(scheduler, config or ServerConfig(), log_level=log_level)

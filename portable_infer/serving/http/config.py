"""What the HTTP layer allows (:class:`ServerConfig`) and the check that its extra is installed."""

from __future__ import annotations

import math
from dataclasses import dataclass

from portable_infer.errors import InvalidArgumentError, require

SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")
# ServerConfig fields that are whole numbers >= 1 (None: derived from the model) and durations
# in seconds > 0; validated at construction
_COUNTS = ("max_prompt_tokens", "max_new_tokens", "max_body_bytes", "max_prompt_chars", "max_messages",
           "max_connections", "tokenizer_threads", "max_tokenizing")
_SECONDS = ("shutdown_timeout_s", "keep_alive_timeout_s", "read_timeout_s", "write_timeout_s")


@dataclass(frozen=True)
class ServerConfig:
    """What the HTTP layer allows (validated at construction).

    ``max_prompt_tokens`` / ``max_new_tokens`` default to the model's context; ``model_name``
    defaults to the package directory's name.

    Limits checked before a prompt is tokenized: ``max_body_bytes``, ``max_messages``, and
    ``max_prompt_chars`` (characters of prompt or message text; default 32 per allowed prompt
    token). Tokenization and chat templates run on ``tokenizer_threads`` threads, off the event
    loop; a request finding ``max_tokenizing`` others already queued there gets a 429 (default:
    as many as the scheduler admits and queues).

    Connections: at most ``max_connections`` are open (a new one first evicts the oldest that
    has no request in the app, else gets a 503); one with no request is closed after
    ``keep_alive_timeout_s``; a request's head and body must arrive within ``read_timeout_s``
    of its first byte (else 408 and close); a client that reads nothing of its response for
    ``write_timeout_s`` is dropped (its request cancelled).

    ``tool_parser`` names the tool-call format of the model's replies (``hermes``,
    ``llama3_json``, ``mistral``: :data:`portable_infer.text.tool_calls.FORMATS`); None reads it from
    the chat template.

    Shutdown (SIGTERM/SIGINT): ``/ready`` turns 503 and new requests get a 503 at once; the
    requests in flight get ``shutdown_timeout_s`` minus a small reserve to finish, then end
    with an OpenAI error (an error event and ``[DONE]`` on streams); the process exits within
    ``shutdown_timeout_s`` (deploy/k8s's terminationGracePeriodSeconds is the same 30 s).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int | None = None
    max_messages: int = 1024
    tokenizer_threads: int = 2
    # None: the scheduler's max_batch + max_waiting (a burst the engine would take is never
    # refused here: 64 refused part of 256 clients arriving at once, docs/serving.md)
    max_tokenizing: int | None = None
    max_connections: int = 1024
    keep_alive_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    write_timeout_s: float = 30.0
    shutdown_timeout_s: float = 30.0
    tool_parser: str | None = None

    def __post_init__(self):
        for name in _COUNTS:
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise InvalidArgumentError(f"{name} must be an int >= 1, got {v!r}", param=name)
        for name in _SECONDS:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                raise InvalidArgumentError(f"{name} must be a finite number of seconds > 0, got {v!r}", param=name)
        if not (isinstance(self.port, int) and 0 <= self.port < 65536):
            raise InvalidArgumentError(f"port must be in [0, 65535], got {self.port!r}", param="port")
        if self.tool_parser is not None:
            from portable_infer.text.tool_calls import detect_format

            detect_format(None, self.tool_parser)  # an unknown name: InvalidArgumentError listing the known ones
        if self.api_key is not None and not self.api_key:
            raise InvalidArgumentError("api_key must not be empty; leave it unset to turn authentication off",
                                       param="api_key")

    def served_name(self, model) -> str:
        if self.model_name:
            return self.model_name
        return model.path.name if getattr(model, "path", None) is not None else model.manifest.model.model_type


def require_serve() -> None:
    """Raise DependencyError with the install hint when a serve dependency is missing."""
    for module in SERVE_MODULES:
        require(module, extra="serve")

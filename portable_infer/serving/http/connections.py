"""Connection limits under uvicorn: idle and slow clients are dropped, open connections bounded.

uvicorn (h11) arms its keep-alive timer only after a response, so a socket that never sends a
byte, one that trickles its headers or stalls its body, or one that stops reading its stream is
held forever, and enough of them exhaust the file descriptors (then ``/health`` times out
too). :func:`.h11guard.guarded_protocol` gives uvicorn's h11 protocol these rules, from a
:class:`ConnectionGuard`::

    connected, no request yet ........ closed after keep_alive_timeout_s      ("idle")
    first byte of a request .......... head + body within read_timeout_s      ("slow_request":
                                         408 and close; the app sees a disconnect if it was reading)
    response paused by a full socket . resumed within write_timeout_s         ("slow_reader": dropped)
    more than max_connections open ... the oldest with no request in the app is evicted
                                         ("evicted"), else the new one gets a JSON 503 ("over_limit")

Each drop is counted (``ConnectionGuard.closed``, in ``/metrics``) and logged at most once per
interval (:mod:`.ratelog`). Rejections are written, then the socket's write side is shut and
what the client still sends is read and discarded for a moment, so the client reads the answer
rather than a reset.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

from portable_infer.serving.http.ratelog import RateLimitedLog

logger = logging.getLogger(__name__)

LINGER_S = 1.0  # how long a rejected connection's late input is read and dropped before closing
MAX_LINGERING = 64  # beyond this many rejected connections lingering at once, close at once
FD_RESERVE = 128  # descriptors kept for model files, logs, threads and the listener


def _raw_response(status: int, reason: str, message: str, code: str, extra: str = "") -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": code}})
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n")
    return head.encode("ascii") + body.encode("utf-8")


class ConnectionGuard:
    """The limits and counters shared by every connection of one server."""

    def __init__(self, config, log: RateLimitedLog | None = None):
        self.keep_alive_s = config.keep_alive_timeout_s
        self.read_s = config.read_timeout_s
        self.write_s = config.write_timeout_s
        self.max_connections = fd_bounded(config.max_connections)
        self.log = log or RateLimitedLog(logger)
        self.open = 0
        self.lingering = 0
        self.closed: Counter = Counter()  # reason -> connections dropped
        self.too_many = _raw_response(503, "Service Unavailable", "the server has too many open connections; "
                                      "retry shortly", "too_many_connections", "retry-after: 1\r\n")
        self.timed_out = _raw_response(408, "Request Timeout", f"the request did not arrive within {self.read_s:g} "
                                       "s of its first byte; send it again, whole", "request_timeout")

    def dropped(self, reason: str, message: str, *args) -> None:
        self.closed[reason] += 1
        self.log.note(reason, message, *args)


def fd_bounded(max_connections: int) -> int:
    """``max_connections``, lowered to what the file-descriptor limit leaves (with a warning)."""
    try:
        import resource
    except ImportError:  # Windows: no RLIMIT_NOFILE
        return max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft - FD_RESERVE >= max_connections:
        return max_connections
    bounded = max(1, soft - FD_RESERVE)
    logger.warning("max_connections %d is above what the file-descriptor limit (%d) leaves; using %d "
                   "(raise `ulimit -n` to allow more)", max_connections, soft, bounded)
    return bounded

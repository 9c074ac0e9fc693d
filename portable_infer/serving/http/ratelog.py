"""Logging that stays readable under a flood: at most one line per kind of event per interval.

A server at its file-descriptor limit, or a crowd of clients hanging up mid-request, produces the
same event thousands of times a second; a traceback for each buries everything else (the issue
measured 49 MB of asyncio tracebacks in 15 s). :class:`RateLimitedLog` writes the first event of
a kind at once and then at most one line per ``interval_s``, saying how many it left out.
:func:`loop_exception_handler` routes asyncio's own reports of exhausted resources and broken
connections through it.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import Counter

INTERVAL_S = 10.0
# OSError numbers that mean "out of a system resource", not a bug: one line per interval
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
HUNG_UP = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


class RateLimitedLog:
    """``note(kind, message, *args)`` logs at most once per ``interval_s`` for each ``kind``.

    Example::

        log = RateLimitedLog(logger)
        log.note("client_disconnect", "a client disconnected during %s", path)
        # the first call logs; later ones within 10 s are counted and reported with the next line
    """

    def __init__(self, logger: logging.Logger, interval_s: float = INTERVAL_S, level: int = logging.WARNING,
                 clock=time.monotonic):
        self.logger, self.interval_s, self.level, self.clock = logger, interval_s, level, clock
        self.counts: Counter = Counter()  # every event noted, by kind (for metrics and tests)
        self._last: dict = {}
        self._levels: dict = {}  # kind -> the level its lines go out at
        self._left_out: Counter = Counter()
        self._lock = threading.Lock()  # the event loop and tokenizer threads both note

    def note(self, kind: str, message: str, *args, level: int | None = None) -> bool:
        """Count one event; log it (at ``level``, default the log's) unless a line of this kind
        went out less than ``interval_s`` ago."""
        level = self.level if level is None else level
        with self._lock:
            self.counts[kind] += 1
            self._levels[kind] = level
            now = self.clock()
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._left_out[kind] += 1
                return False
            self._last[kind] = now
            left_out = self._left_out.pop(kind, 0)
        if left_out:
            message += f" (and {left_out} more like it in the last {now - last:.0f} s)"
        self.logger.log(level, message, *args)
        return True

    def flush(self) -> None:
        """Report the events left out since each kind's last line (at shutdown)."""
        with self._lock:
            left_out, self._left_out = self._left_out, Counter()
        for kind, n in sorted(left_out.items()):
            self.logger.log(self._levels.get(kind, self.level), "%d more %s events since the last report", n, kind)


def loop_exception_handler(log: RateLimitedLog):
    """An asyncio exception handler: exhausted resources (EMFILE...) and hung-up connections go
    through ``log``, one line per interval and no traceback; anything else to asyncio's default."""

    def handle(loop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in EXHAUSTED:
            log.note("resource_exhausted", "out of a system resource (%s: %s); new connections wait. Lower "
                     "--max-connections or raise the file-descriptor limit (ulimit -n)",
                     errno.errorcode.get(exc.errno, exc.errno), context.get("message", exc.strerror))
            return
        if isinstance(exc, HUNG_UP):
            log.note("client_disconnect", "a client connection broke: %s", type(exc).__name__)
            return
        loop.default_exception_handler(context)

    return handle

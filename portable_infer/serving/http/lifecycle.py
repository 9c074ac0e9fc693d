"""Graceful shutdown: serving -> draining -> stopped, and the requests in flight meanwhile.

::

    SIGTERM / SIGINT (uvicorn sets should_exit; runner.py calls step() every 0.1 s)
      │  /ready -> 503, new /v1 requests -> 503 "server_shutting_down"; the listener stays open
      v
    draining: requests in flight finish (up to shutdown_timeout_s - 2 x reserve)
      │  deadline: each one still running is cancelled and marked aborted; its stream ends with
      │  an OpenAI error event and [DONE], a non-streaming one gets a JSON 503
      v
    stopped (all ended, or one more reserve passed): uvicorn closes the listener and the
    connections, giving stragglers the last reserve (timeout_graceful_shutdown)

The reserve is a tenth of the period, at most 2 s: with the default 30 s, requests get 26 s and
the process is gone by 30 s, when Kubernetes (terminationGracePeriodSeconds: 30) would kill it.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


def reserve_s(shutdown_timeout_s: float) -> float:
    """The time kept after the drain deadline for aborted requests to end and connections to close."""
    return min(2.0, shutdown_timeout_s / 10)


class Flight:
    """One /v1 request from admission until its response is sent (``handle`` once submitted)."""

    __slots__ = ("handle", "aborted")

    def __init__(self):
        self.handle = None
        self.aborted = False  # ended by the shutdown deadline: answer with an error, not a result


class Lifecycle:
    """The server's shutdown state and its requests in flight (event-loop thread only).

    Example (what runner.py does on each uvicorn tick once a signal arrived)::

        if lifecycle.step():      # True when every request ended or the period ran out
            stop_the_server()
    """

    def __init__(self, shutdown_timeout_s: float, clock=time.monotonic):
        self.shutdown_timeout_s = shutdown_timeout_s
        self.reserve_s = reserve_s(shutdown_timeout_s)
        self.clock = clock
        self.flights: set = set()
        self.draining = False
        self._started = self._aborted_at = None

    @property
    def in_flight(self) -> int:
        return len(self.flights)

    def admit(self) -> Flight | None:
        """A new request's flight, or None while shutting down (the caller answers 503)."""
        if self.draining:
            return None
        flight = Flight()
        self.flights.add(flight)
        return flight

    def done(self, flight: Flight) -> None:
        self.flights.discard(flight)

    def step(self) -> bool:
        """Advance the shutdown (the first call starts it); True once the server may stop."""
        now = self.clock()
        if not self.draining:
            self.draining, self._started = True, now
            logger.warning("shutting down: /ready answers 503, new requests 503; %d in flight get up to %.1f s",
                           len(self.flights), self.drain_s)
        if not self.flights:
            return True
        if self._aborted_at is None:
            if now < self._started + self.drain_s:
                return False
            self.abort()
            self._aborted_at = now
        return now >= self._aborted_at + self.reserve_s

    @property
    def drain_s(self) -> float:
        return self.shutdown_timeout_s - 2 * self.reserve_s

    def abort(self) -> None:
        """End every request in flight now: cancelled in the scheduler (slot and KV back at once)
        and marked, so that its response is an error rather than a truncated result."""
        logger.warning("shutdown period over: ending %d requests still in flight with an error", len(self.flights))
        for flight in list(self.flights):
            flight.aborted = True
            if flight.handle is not None:
                flight.handle.cancel()

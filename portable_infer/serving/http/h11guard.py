"""uvicorn's h11 protocol with the rules of :mod:`.connections`: idle and slow clients dropped, open
connections bounded. Imports uvicorn: load it only with the ``serve`` extra (runner.py does)."""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from portable_infer.serving.http.connections import LINGER_S, MAX_LINGERING, ConnectionGuard


def guarded_protocol(guard: ConnectionGuard) -> type:
    """The protocol class for uvicorn's ``http=`` with ``guard``'s timeouts and connection bound."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under a :class:`ConnectionGuard` (the class attribute ``guard``)."""

    guard: ConnectionGuard

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._timer = self._write_timer = None
        self._reading = self._rejected = self._lingering = False
        self._since = self.loop.time()
        self.guard.open += 1
        if len(self.connections) > self.guard.max_connections and not self._evict_one():
            self.guard.dropped("over_limit", "refused a connection: %d open (max_connections)",
                               len(self.connections))
            self._reject(self.guard.too_many)
            return
        self._arm(self.guard.keep_alive_s, self._idle)

    def connection_lost(self, exc) -> None:
        self.guard.open -= 1
        self.guard.lingering -= self._lingering
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return  # the answer is out; what else comes is dropped
        if not self._reading:  # a request starts: its deadline runs from this first byte
            self._reading = True
            self._arm(self.guard.read_s, self._slow_request)
        super().data_received(data)
        if not self._request_pending():
            self._reading = False
            self._cancel(self._timer)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.guard.write_s, self._slow_reader)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel(self._write_timer)
        self._write_timer = None

    # --- the rules ---------------------------------------------------------------------------
    def _idle(self) -> None:
        if not self.transport.is_closing() and self.cycle is None:
            self.guard.dropped("idle", "closed a connection that sent no request within %g s",
                               self.guard.keep_alive_s)
            self.transport.close()

    def _slow_request(self) -> None:
        if self.transport.is_closing() or not self._request_pending():
            return
        self.guard.dropped("slow_request", "closed a connection whose request did not arrive within %g s",
                           self.guard.read_s)
        if self._busy():
            self.transport.close()  # the app is reading the body: it sees a disconnect
        else:
            self._reject(self.guard.timed_out)

    def _slow_reader(self) -> None:
        self._write_timer = None
        if not self.transport.is_closing():
            self.guard.dropped("slow_reader", "dropped a client that read nothing of its response for %g s",
                               self.guard.write_s)
            self.transport.abort()  # close() would wait for the buffer the client does not read

    # --- helpers ------------------------------------------------------------------------------
    def _request_pending(self) -> bool:
        state = self.conn.their_state
        return state is h11.SEND_BODY or (state is h11.IDLE and bool(self.conn.trailing_data[0]))

    def _busy(self) -> bool:
        """Whether the app is serving a request on this connection."""
        return self.cycle is not None and not self.cycle.response_complete

    def _evict_one(self) -> bool:
        idle = [c for c in self.connections if c is not self and not getattr(c, "_rejected", True)
                and not c._busy()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._since)
        self.guard.dropped("evicted", "closed the oldest connection without a request to admit a new one "
                           "(max_connections %d)", self.guard.max_connections)
        oldest._rejected = True
        oldest.transport.abort()
        return True

    def _reject(self, answer: bytes) -> None:
        self._rejected = True
        self._cancel_timers()
        self.transport.write(answer)
        if self.guard.lingering < MAX_LINGERING and self.transport.can_write_eof():
            self._lingering = True
            self.guard.lingering += 1
            self.transport.write_eof()
            self._timer = self.loop.call_later(LINGER_S, self.transport.abort)
        else:
            self.transport.close()

    def _arm(self, seconds: float, callback) -> None:
        self._cancel(self._timer)
        self._timer = self.loop.call_later(seconds, callback)

    @staticmethod
    def _cancel(timer) -> None:
        if timer is not None:
            timer.cancel()

    def _cancel_timers(self) -> None:
        self._cancel(self._timer)
        self._cancel(self._write_timer)

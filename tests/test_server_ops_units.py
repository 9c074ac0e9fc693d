"""Units of the server's operations, without a model: the rate-limited log, the shutdown state
machine (a fake clock), the connection guard's slow-reader rule (a fake transport), ServerConfig's
validation and the `serve` flags."""

from __future__ import annotations

import asyncio
import errno
import logging

import pytest

from portable_infer.errors import InvalidArgumentError
from portable_infer.serving.http import ServerConfig
from portable_infer.serving.http.lifecycle import Lifecycle, reserve_s
from portable_infer.serving.http.ratelog import RateLimitedLog, loop_exception_handler


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


# --- rate-limited logging --------------------------------------------------------------------------
def test_a_flood_of_events_gives_one_line_per_interval(caplog):
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("test.flood"), interval_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.flood"):
        for _ in range(1000):
            log.note("resource_exhausted", "out of file descriptors")
        log.note("client_disconnect", "a client left", level=logging.INFO)
        assert [r.getMessage() for r in caplog.records] == ["out of file descriptors", "a client left"]
        clock.now += 10
        log.note("resource_exhausted", "out of file descriptors")
        assert caplog.records[-1].getMessage() == "out of file descriptors (and 999 more like it in the last 10 s)"
        clock.now += 1
        log.note("resource_exhausted", "out of file descriptors")
        log.flush()
    assert len(caplog.records) == 4 and "1 more resource_exhausted" in caplog.records[-1].getMessage()
    assert log.counts == {"resource_exhausted": 1002, "client_disconnect": 1}


class FakeLoop:
    def __init__(self):
        self.defaulted = []

    def default_exception_handler(self, context):
        self.defaulted.append(context)


def test_loop_handler_rate_limits_exhaustion_and_hangups_only(caplog):
    log = RateLimitedLog(logging.getLogger("test.loop"), interval_s=60)
    handle, loop = loop_exception_handler(log), FakeLoop()
    with caplog.at_level(logging.WARNING, logger="test.loop"):
        for _ in range(500):
            handle(loop, {"message": "socket.accept() out of system resource",
                          "exception": OSError(errno.EMFILE, "Too many open files")})
            handle(loop, {"message": "Fatal read error", "exception": ConnectionResetError()})
    assert len(caplog.records) == 2 and not any(r.exc_info for r in caplog.records)
    assert "EMFILE" in caplog.records[0].getMessage() and "ulimit -n" in caplog.records[0].getMessage()
    assert loop.defaulted == []
    bug = {"message": "boom", "exception": ZeroDivisionError()}
    handle(loop, bug)
    assert loop.defaulted == [bug]  # a real bug keeps asyncio's traceback


# --- the shutdown state machine --------------------------------------------------------------------
class Handle:
    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


def test_shutdown_with_nothing_in_flight_stops_at_once():
    life = Lifecycle(30, clock=Clock())
    assert not life.draining and life.step() and life.draining
    assert life.admit() is None  # refused from now on


def test_shutdown_waits_for_requests_then_aborts_at_the_deadline():
    clock = Clock()
    life = Lifecycle(30, clock=clock)
    assert (life.reserve_s, life.drain_s) == (2.0, 26.0)
    quick, slow, parsing = life.admit(), life.admit(), life.admit()
    quick.handle, slow.handle = Handle(), Handle()
    assert not life.step()
    life.done(quick)  # finished within the period
    clock.now += 25.9
    assert not life.step() and not slow.aborted
    clock.now += 0.1  # the deadline: what still runs is cut off, marked so its answer is an error
    assert not life.step()
    assert slow.aborted and slow.handle.cancelled and parsing.aborted and not quick.aborted
    assert not quick.handle.cancelled
    life.done(slow)
    life.done(parsing)
    assert life.step()


def test_shutdown_stops_after_the_reserve_even_with_stragglers():
    clock = Clock()
    life = Lifecycle(10, clock=clock)
    life.admit()
    assert not life.step()  # the signal
    clock.now += life.drain_s
    assert not life.step()  # the deadline: aborted now
    clock.now += life.reserve_s
    assert life.step()
    assert life.drain_s + 2 * life.reserve_s == 10  # all of it within the period


@pytest.mark.parametrize("period, reserve", [(30, 2.0), (4, 0.4), (0.5, 0.05)])
def test_reserve_is_a_tenth_at_most_two_seconds(period, reserve):
    assert reserve_s(period) == pytest.approx(reserve)


# --- the slow-reader rule on a fake transport ------------------------------------------------------
class FakeTransport:
    def __init__(self):
        self.aborted = self.closed = False

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1234) if name in ("peername", "sockname") else default

    def is_closing(self):
        return self.aborted or self.closed

    def abort(self):
        self.aborted = True

    def close(self):
        self.closed = True

    def set_protocol(self, protocol):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def test_a_client_that_reads_nothing_is_dropped():
    pytest.importorskip("uvicorn")
    from uvicorn import Config
    from uvicorn.server import ServerState

    from portable_infer.serving.http.connections import ConnectionGuard
    from portable_infer.serving.http.h11guard import guarded_protocol

    guard = ConnectionGuard(ServerConfig(write_timeout_s=0.05, keep_alive_timeout_s=30))

    async def app(scope, receive, send):
        pass

    async def scenario():
        cls = guarded_protocol(guard)
        config = Config(app, http=cls)
        config.load()
        protocol = cls(config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop())
        transport = FakeTransport()
        protocol.connection_made(transport)
        protocol.pause_writing()  # the socket's buffer is full: the client is not reading
        for _ in range(200):
            if transport.aborted:
                break
            await asyncio.sleep(0.05)
        return transport, protocol

    transport, protocol = asyncio.run(scenario())
    assert transport.aborted and guard.closed["slow_reader"] == 1


# --- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("shutdown_timeout_s", 0), ("shutdown_timeout_s", float("nan")), ("shutdown_timeout_s", True),
    ("read_timeout_s", -1), ("keep_alive_timeout_s", float("inf")), ("max_connections", 0),
    ("max_connections", True), ("tokenizer_threads", 1.5), ("max_prompt_chars", 0), ("max_body_bytes", False),
])
def test_server_config_rejects(field, value):
    with pytest.raises(InvalidArgumentError, match=field) as err:
        ServerConfig(**{field: value})
    assert err.value.param == field


def test_serve_flags_reach_server_config():
    from portable_infer.cli import SERVE_LIMITS, build_parser

    ns = build_parser().parse_args(["serve", "--shutdown-timeout", "12.5", "--keep-alive-timeout", "3",
                                    "--read-timeout", "7", "--write-timeout", "8", "--max-connections", "9",
                                    "--max-prompt-chars", "100", "--max-messages", "4", "--tokenizer-threads", "3",
                                    "--max-tokenizing", "5"])
    config = ServerConfig(**{name: getattr(ns, name) for name in SERVE_LIMITS})
    assert (config.shutdown_timeout_s, config.keep_alive_timeout_s, config.read_timeout_s, config.write_timeout_s,
            config.max_connections, config.max_prompt_chars, config.max_messages, config.tokenizer_threads,
            config.max_tokenizing) == (12.5, 3, 7, 8, 9, 100, 4, 3, 5)
    defaults = build_parser().parse_args(["serve"])
    assert all(getattr(defaults, name) is None for name in SERVE_LIMITS)  # ServerConfig's defaults apply


# --- the stream's end ------------------------------------------------------------------------------
class FakeHandle:
    """Yields ``items`` (a Response, or an exception to raise) like a RequestHandle."""

    def __init__(self, items):
        self.items, self.prompt_tokens, self.cancelled, self.stats = list(items), 3, False, None

    @property
    def done(self):
        return self.stats is not None

    def cancel(self):
        self.cancelled = True

    def ready(self):  # what a real handle has queued already: here nothing (one piece per read)
        return []

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            self.stats = "failed"
            raise item
        if item.finish_reason is not None:
            self.stats = "ended"
        return item


def collect(handle, flight=None):
    pytest.importorskip("fastapi")
    from portable_infer.serving.http.generation import sse
    from portable_infer.serving.http.protocol import Reply

    async def run():
        return [x async for x in sse(handle, Reply(False, "tiny"), False, flight, ServerConfig(shutdown_timeout_s=7))]
    return asyncio.run(run())


def test_a_failed_generation_ends_its_stream_with_an_error_event_and_done():
    from portable_infer.errors import GenerationError
    from portable_infer.text.streaming import Response

    events = collect(FakeHandle([Response("Hi", 5, None), GenerationError("logits are NaN", "nan_logits")]))
    assert events[-1] == "data: [DONE]\n\n" and '"code":' in events[-2] and "logits are NaN" in events[-2]
    assert '"text":"Hi"' in events[0]


def test_a_stream_cut_off_by_the_shutdown_ends_with_its_error_and_done():
    from portable_infer.serving.http.lifecycle import Flight
    from portable_infer.text.streaming import Response

    flight = Flight()
    flight.aborted = True
    events = collect(FakeHandle([Response("Hi", 5, None), Response("", None, "cancelled")]), flight)
    assert events[-1] == "data: [DONE]\n\n" and "server_shutting_down" in events[-2] and "7 s" in events[-2]
    assert len(events) == 3  # the token, the error, [DONE]: no "cancelled" chunk


def test_generation_errors_from_the_clients_values_are_400s():
    from portable_infer.errors import InvalidArgumentError, PortableInferError
    from portable_infer.serving.http.generation import generation_error

    bad = generation_error(InvalidArgumentError("repetition_penalty overflows the logits", param="repetition_penalty"))
    assert bad.status == 400 and bad.body()["error"]["param"] == "repetition_penalty"
    assert generation_error(PortableInferError("engine broke")).status == 500


def test_the_tokenizer_queue_takes_what_the_scheduler_takes_by_default():
    """A burst the engine would admit and queue is not refused before tokenizing: 64 refused part
    of 256 clients arriving at once on the GPU (docs/benchmarks.md, Session 12)."""
    from types import SimpleNamespace

    from portable_infer.serving.http.admission import Admission
    from portable_infer.serving.http.config import ServerConfig

    sched = SimpleNamespace(config=SimpleNamespace(max_batch=256, max_waiting=1024))
    assert Admission(sched, ServerConfig(), 128).max_queued == 1280
    assert Admission(sched, ServerConfig(max_tokenizing=3), 128).max_queued == 3


def test_a_stream_that_fell_behind_sends_what_is_queued_as_one_chunk():
    """Pieces already queued when the stream reads go out as one SSE chunk: the text joined, the
    finish reason and usage of the last; what the client assembles is unchanged."""
    import json

    from portable_infer.serving.handle import RequestStats, open_handle
    from portable_infer.text.streaming import Response

    handle, writer = open_handle("r", 3, lambda _: None, None)
    words = ["The", " capital", " of", " France", " is"]
    for i, w in enumerate(words):
        writer.put(Response(w, 10 + i, None, generation_tokens=i + 1))
    writer.end(Response(" Paris.", 20, "length", generation_tokens=6),
               RequestStats("r", 3, 6, "length", 0.0, 0.1, (), 0.2))
    events = collect(handle)
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len(chunks) == 1, chunks  # all six pieces were queued: one chunk
    assert chunks[0]["choices"][0]["text"] == "".join(words) + " Paris."
    assert chunks[0]["choices"][0]["finish_reason"] == "length"
    assert handle.done and handle.stats.generation_tokens == 6

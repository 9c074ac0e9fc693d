"""A request's two ends (serving/handle.py): what the scheduler's HandleWriter puts, the caller's
RequestHandle reads, in order, from another thread or an asyncio loop; the end carries the stats."""

from __future__ import annotations

import asyncio
import threading

import pytest

from portable_infer.errors import GenerationError
from portable_infer.serving.handle import RequestStats, open_handle
from portable_infer.text.streaming import Response


def _stats(reason: str, n: int) -> RequestStats:
    return RequestStats("req-0", 3, n, reason, queue_s=0.0, ttft_s=0.1, inter_token_s=(), total_s=0.2)


def _pieces(n: int) -> list:
    return [Response(f"t{i}", i, None) for i in range(n)] + [Response("end", n, "stop")]


def _write_later(writer, pieces, last_stats, error=None):
    def run():
        for p in pieces[:-1]:
            writer.put(p)
        writer.end(error if error is not None else pieces[-1], last_stats)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_reader_gets_what_the_writer_put_then_the_end():
    cancelled = []
    handle, writer = open_handle("req-0", 3, cancelled.append, "token")
    pieces, stats = _pieces(5), _stats("stop", 6)
    t = _write_later(writer, pieces, stats)
    got = list(handle)
    t.join()
    assert got == pieces and handle.done and handle.stats is stats
    with pytest.raises(StopIteration):
        handle.get(timeout=1)
    handle.cancel()
    assert cancelled == ["token"]  # cancel() hands the scheduler its own token back


def test_the_exception_that_ends_a_request_reaches_its_reader():
    handle, writer = open_handle("req-0", 3, lambda _: None, None)
    pieces, error = _pieces(2), GenerationError("NaN logits", reason="nan_logits")
    t = _write_later(writer, pieces, _stats("error", 2), error)
    assert handle.get(timeout=5) == pieces[0]
    assert handle.get(timeout=5) == pieces[1]
    with pytest.raises(GenerationError) as err:
        handle.get(timeout=5)
    t.join()
    assert err.value is error and handle.done and handle.stats.finish_reason == "error"


def test_an_asyncio_reader_is_woken_by_the_writer():
    handle, writer = open_handle("req-0", 3, lambda _: None, None)
    pieces = _pieces(4)

    async def read():
        started = asyncio.Event()
        out = []

        async def consume():
            started.set()
            async for r in handle:
                out.append(r)

        task = asyncio.create_task(consume())
        await started.wait()
        t = _write_later(writer, pieces, _stats("stop", 5))  # from another thread, as the scheduler does
        await asyncio.wait_for(task, 10)
        t.join()
        return out

    assert asyncio.run(read()) == pieces
    assert handle.text() == "" and handle.done

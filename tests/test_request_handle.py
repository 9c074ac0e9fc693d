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


def test_readers_of_one_loop_share_one_wake_up_per_batch_of_pieces(monkeypatch):
    """Pieces for many handles read in one asyncio loop, written while the loop is busy, schedule
    one callback on it (not one per handle); every reader still gets every piece, in order."""
    streams, n = 32, 3
    pairs = [open_handle(f"req-{i}", 3, lambda _: None, None) for i in range(streams)]

    async def read():
        loop = asyncio.get_running_loop()
        calls = []
        real = loop.call_soon_threadsafe
        monkeypatch.setattr(loop, "call_soon_threadsafe", lambda cb, *a: calls.append(cb) or real(cb, *a))
        outs = [[] for _ in pairs]
        ready = [asyncio.Event() for _ in pairs]

        async def consume(i):
            ready[i].set()
            async for r in pairs[i][0]:
                outs[i].append(r)

        tasks = [asyncio.create_task(consume(i)) for i in range(streams)]
        for e in ready:
            await e.wait()
        await asyncio.sleep(0)  # every reader is parked on its event now
        for step in range(n):  # one "decode step": a piece for every stream, the loop blocked meanwhile
            written = threading.Thread(target=lambda: [w.put(Response(f"t{step}", step, None)) for _, w in pairs])
            written.start()
            written.join()
            assert len(calls) == step + 1, calls
            await asyncio.sleep(0.01)
        for _, w in pairs:
            w.end(Response("end", n, "stop"), _stats("stop", n + 1))
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return outs

    outs = asyncio.run(read())
    assert all([r.text for r in out] == ["t0", "t1", "t2", "end"] for out in outs)

"""One scheduled request's two ends: the caller's :class:`RequestHandle` (stream its pieces, sync
or async, or cancel it) and the scheduler's :class:`HandleWriter` (hand it pieces, then end it).

::

    scheduler thread                                 any thread / an asyncio loop
    HandleWriter.put(Response) ...  ──> pieces ──>   for r in handle / async for r in handle
    HandleWriter.end(last | exception, stats)        (the last piece has a finish_reason)

:func:`open_handle` makes the pair over one queue of pieces. A reader is woken through a
condition, or in an asyncio loop through its :class:`LoopWaker`: the handles of one loop that got
pieces share one ``call_soon_threadsafe`` until the loop runs it (no thread parked per stream, and
one wake-up of the loop per decode step rather than one per stream: at 256 streams the per-row
wake-ups cost the scheduler's thread ~5 ms a step, ``benchmarks/host_overhead.py``).
The last piece's ``finish_reason`` is "stop", "length" or "cancelled"; a request that failed
ends with its exception instead, raised to the reader.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from portable_infer.text.streaming import Response


@dataclass(frozen=True)
class RequestStats:
    """Timings of one finished request (seconds, from its submission)."""

    id: str
    prompt_tokens: int
    generation_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    queue_s: float  # waiting for a slot and KV blocks
    ttft_s: float | None  # time to first token (queue + prefill); None if none came
    inter_token_s: tuple  # gaps between consecutive tokens
    total_s: float


def open_handle(request_id: str, prompt_tokens: int, canceller: Callable, token) -> tuple:
    """``(RequestHandle, HandleWriter)`` of one request: the caller reads what the scheduler writes.
    ``canceller(token)`` is what ``handle.cancel()`` calls."""
    handle = RequestHandle(request_id, prompt_tokens, canceller, token)
    return handle, HandleWriter(handle)


class HandleWriter:
    """The producer side of a :class:`RequestHandle` (the scheduler's thread): :meth:`put` each
    piece, then :meth:`end` it once."""

    def __init__(self, handle: RequestHandle):
        self._handle = handle

    def put(self, piece: Response) -> None:
        """Hand the reader its next piece (one without a ``finish_reason``)."""
        self._handle._push(piece)

    def end(self, last: Response | BaseException, stats: RequestStats) -> None:
        """End the request: ``stats`` become the handle's, and ``last`` (the piece with its
        ``finish_reason``, or the exception that ended it) goes to the reader."""
        self._handle.stats = stats
        self._handle._push(last)


class RequestHandle:
    """One submitted request. Iterate it for :class:`Response` pieces; ``cancel()`` to drop it.
    Its pieces come from the scheduler through its :class:`HandleWriter` (see :func:`open_handle`).

    Example::

        handle = scheduler.submit("Once upon a time", max_new_tokens=32)
        for r in handle:            # or: async for r in handle
            print(r.text, end="")
    """

    def __init__(self, request_id: str, prompt_tokens: int, canceller: Callable, token):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.stats: RequestStats | None = None  # set when it ends
        self._canceller = canceller
        self._token = token  # what the scheduler knows this request by
        self._cond = threading.Condition()
        self._items: deque = deque()
        self._ended = False  # the reader has seen the last piece
        self._waker: LoopWaker | None = None  # of the asyncio loop that reads it, if one does
        self._event: asyncio.Event | None = None

    def cancel(self) -> None:
        """Stop generating; the slot and KV blocks are given back at once (idempotent)."""
        self._canceller(self._token)

    @property
    def done(self) -> bool:
        return self.stats is not None

    def _push(self, item) -> None:
        """Queue ``item`` and wake the reader (called by this handle's :class:`HandleWriter`)."""
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            waker, event = self._waker, self._event
        if waker is not None:
            waker.wake(event)

    # --- consumer side --------------------------------------------------------------------------
    def _take(self, item) -> Response:
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if item.finish_reason is not None:
            self._ended = True
        return item

    def get(self, timeout: float | None = None) -> Response:
        """The next piece (blocks); raises StopIteration after the last one, TimeoutError on timeout."""
        with self._cond:
            if self._ended and not self._items:
                raise StopIteration
            if not self._cond.wait_for(lambda: self._items, timeout):
                raise TimeoutError(f"no token from request {self.id} within {timeout} s")
            item = self._items.popleft()
        return self._take(item)

    def __iter__(self) -> Iterator[Response]:
        while True:
            try:
                yield self.get()
            except StopIteration:
                return
            if self._ended:
                return

    async def aget(self) -> Response:
        """The next piece, awaited; raises StopAsyncIteration after the last one."""
        while True:
            with self._cond:
                if self._items:
                    return self._take(self._items.popleft())
                if self._ended:
                    raise StopAsyncIteration
                if self._waker is None:
                    self._waker, self._event = LoopWaker.of(asyncio.get_running_loop()), asyncio.Event()
                self._event.clear()
            await self._event.wait()

    def ready(self) -> list:
        """The pieces queued now, without waiting (up to an error, which the next read raises;
        through the last piece): a reader that fell behind takes them together."""
        out = []
        with self._cond:
            while self._items and not isinstance(self._items[0], BaseException):
                item = self._items.popleft()
                out.append(item)
                if item.finish_reason is not None:
                    self._ended = True
                    break
        return out

    def __aiter__(self) -> AsyncIterator[Response]:
        return self

    async def __anext__(self) -> Response:
        if self._ended and not self._items:
            raise StopAsyncIteration
        return await self.aget()

    def text(self, timeout: float | None = None) -> str:
        """Block until the request ends and return its whole text."""
        out = []
        while not self._ended:
            out.append(self.get(timeout).text)
        return "".join(out)


class LoopWaker:
    """Sets the events of one asyncio loop's readers from other threads, in batches: the first
    :meth:`wake` schedules one callback on the loop, later ones until it runs join that batch."""

    _wakers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWaker]" = weakref.WeakKeyDictionary()
    _made = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._events: list = []  # to set when the scheduled callback runs; empty: none scheduled

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "LoopWaker":
        """The waker of ``loop`` (one per loop)."""
        with cls._made:
            waker = cls._wakers.get(loop)
            if waker is None:
                waker = cls._wakers[loop] = cls(loop)
            return waker

    def wake(self, event: asyncio.Event) -> None:
        """Set ``event`` on the loop soon (any thread)."""
        with self._lock:
            self._events.append(event)
            if len(self._events) > 1:  # a callback is scheduled and has not run: it sets this one too
                return
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("the loop is gone")
            loop.call_soon_threadsafe(self._fire)
        except RuntimeError:  # the reader's loop is closed: nobody is listening
            with self._lock:
                self._events.clear()

    def _fire(self) -> None:
        with self._lock:
            events, self._events = self._events, []
        for event in events:
            event.set()

"""The caller's side of one scheduled request: stream its pieces (sync or async), or cancel it.

The scheduler thread puts :class:`~portable_infer.text.streaming.Response` pieces (or an exception)
into the handle; a reader takes them with ``for r in handle`` from any thread, or with
``async for r in handle`` inside an asyncio loop (woken through ``call_soon_threadsafe``, so no
thread is parked per stream). The last piece has a ``finish_reason``: "stop", "length" or
"cancelled".
"""

from __future__ import annotations

import asyncio
import threading
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


class RequestHandle:
    """One submitted request. Iterate it for :class:`Response` pieces; ``cancel()`` to drop it.

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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def cancel(self) -> None:
        """Stop generating; the slot and KV blocks are given back at once (idempotent)."""
        self._canceller(self._token)

    @property
    def done(self) -> bool:
        return self.stats is not None

    # --- producer side (scheduler thread) -------------------------------------------------------
    def _put(self, item) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            loop, event = self._loop, self._event
        if loop is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the reader's loop is closed: nobody is listening
                pass

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
                if self._loop is None:
                    self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
                self._event.clear()
            await self._event.wait()

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

"""A thread that drains a queue in batches: producers ``put`` items (any thread, never blocking on
the work), the thread hands every item that piled up since its last call to ``handle`` in one
list, in order. ``close`` lets it hand over what is left, then stops it.

The scheduler's emitter (each step's results made into text off the step loop) and the engine
process's outbox (pieces sent in one message per batch) are two of these.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class DrainThread:
    """Calls ``handle(items)`` on a thread of its own with every item put since its last call."""

    def __init__(self, handle: Callable[[list], None], name: str):
        self._handle = handle
        self._cond = threading.Condition()
        self._items: list = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item) -> None:
        with self._cond:
            self._items.append(item)
            if len(self._items) == 1:
                self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Hand over what was put, then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._items or self._closed):
                    self._cond.wait()
                items, self._items = self._items, []
            if not items:
                return
            try:
                self._handle(items)
            except Exception:  # noqa: BLE001 - the handler fails its own items; this is a bug, logged
                logger.exception("%s failed", self._thread.name)

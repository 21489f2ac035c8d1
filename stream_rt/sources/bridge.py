"""Hand items from a worker thread to the event loop, with back-pressure.

The thread blocks in :meth:`ThreadBridge.put` while ``capacity`` items wait, so a decoder
never runs unboundedly ahead of the graph. The loop is woken only when it is actually
waiting, so a busy consumer pays no cross-thread call per item.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

EMPTY = object()
"""Returned by :meth:`ThreadBridge.get_nowait` when nothing is waiting."""


class ThreadBridge:
    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int = 16) -> None:
        self._loop = loop
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._space = threading.Semaphore(capacity)
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def put(self, item: Any) -> bool:
        """Thread side: queue ``item``, waiting for room. False once the bridge is closed."""
        while not self._space.acquire(timeout=0.1):
            if self.closed:
                return False
        if self.closed:
            return False
        with self._lock:
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            try:
                self._loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                return False
        return True

    def get_nowait(self) -> Any:
        """Loop side: the next item, or :data:`EMPTY`."""
        with self._lock:
            if not self._items:
                return EMPTY
            item = self._items.popleft()
        self._space.release()
        return item

    async def get(self) -> Any:
        """Loop side: wait for the next item."""
        while True:
            with self._lock:
                if self._items:
                    item = self._items.popleft()
                    break
                waiter = self._loop.create_future()
                self._waiter = waiter
            await waiter
        self._space.release()
        return item

    def close(self) -> None:
        """Stop accepting items; a thread blocked in :meth:`put` gives up within 0.1 s."""
        self.closed = True


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)

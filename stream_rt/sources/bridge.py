"""Hand items from a worker thread to the event loop, with back-pressure.

The thread blocks in :meth:`ThreadBridge.put` while ``capacity`` items wait, so a decoder
never runs unboundedly ahead of the graph. The loop is woken only when it is actually
waiting, so a busy consumer pays no cross-thread call per item; with ``wake_batch > 1``
a waiting loop is woken once that many items are ready (or on ``put(..., last=True)``),
which trades a little latency for far fewer wake-ups when replaying files faster than
real time.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

EMPTY = object()
"""Returned by :meth:`ThreadBridge.get_nowait` when nothing is waiting."""


class ThreadBridge:
    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int = 16, wake_batch: int = 1) -> None:
        if not 1 <= wake_batch <= capacity:
            raise ValueError("wake_batch must be between 1 and capacity")
        self._loop = loop
        self._capacity = capacity
        self._wake_batch = wake_batch
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._producer_waiting = False
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def put(self, item: Any, last: bool = False) -> bool:
        """Thread side: queue ``item``, waiting for room. False once the bridge is closed.
        ``last``: no more items follow soon, so wake the loop now."""
        with self._lock:
            while len(self._items) >= self._capacity and not self.closed:
                self._producer_waiting = True
                self._not_full.wait(0.1)
            if self.closed:
                return False
            self._items.append(item)
            waiter = self._waiter
            if waiter is not None and (last or len(self._items) >= self._wake_batch):
                self._waiter = None
            else:
                waiter = None
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
            if self._producer_waiting:
                self._producer_waiting = False
                self._not_full.notify()
        return item

    def drain(self) -> list[Any]:
        """Loop side: every item waiting now (possibly none), in order."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            if self._producer_waiting:
                self._producer_waiting = False
                self._not_full.notify()
        return items

    async def get(self) -> Any:
        """Loop side: wait for the next item."""
        while True:
            item = self.get_nowait()
            if item is not EMPTY:
                return item
            with self._lock:
                if self._items:
                    continue
                waiter = self._loop.create_future()
                self._waiter = waiter
            await waiter

    def close(self) -> None:
        """Stop accepting items; a thread blocked in :meth:`put` gives up within 0.1 s."""
        self.closed = True


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)

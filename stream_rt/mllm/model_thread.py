"""The one thread a local model runs on.

Work is taken in order by a single **daemon** thread, apart from the event loop's default
pool (which snapshots, request building and frame decoding share), so a model that hangs
can never take perception's threads, and a call that cannot be interrupted (a vision
encoder or a prefill that hangs) never keeps the daemon from exiting: the workers of a
``ThreadPoolExecutor`` are joined at interpreter exit, this thread is not. ``busy_since``
says since when the thread has been on its current work (``time.monotonic()``), ``None``
while it is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any], asyncio.AbstractEventLoop]


class ModelThread:
    def __init__(self, name: str) -> None:
        self.busy_since: float | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the thread, after the work before it. Cancelling the awaiting
        task gives up on the result (work not yet started is skipped; work under way runs on)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, args, future, loop))
        return await future

    @property
    def idle(self) -> bool:
        """Nothing under way and nothing queued."""
        return self.busy_since is None and self._jobs.empty()

    def close(self) -> None:
        """Let the thread end once the work queued before now is done."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, future, loop = job
            if future.cancelled():
                continue
            self.busy_since = time.monotonic()
            try:
                result = fn(*args)
            except BaseException as exc:
                _hand_over(loop, future, exc, failed=True)
            else:
                _hand_over(loop, future, result, failed=False)
            finally:
                self.busy_since = None


def _hand_over(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], value: Any, failed: bool) -> None:
    def settle() -> None:
        if not future.done():
            future.set_exception(value) if failed else future.set_result(value)

    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
        loop.call_soon_threadsafe(settle)

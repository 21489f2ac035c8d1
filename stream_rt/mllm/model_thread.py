"""The one thread a local model runs on.

Work is taken in order by a single **daemon** thread, apart from the event loop's default
pool (which snapshots, request building and frame decoding share), so a model that hangs
can never take perception's threads, and a call that cannot be interrupted (a vision
encoder or a prefill that hangs) never keeps the daemon from exiting: the workers of a
``ThreadPoolExecutor`` are joined at interpreter exit, this thread is not. ``busy_since``
says since when the thread has been on its current work (``time.monotonic()``), ``None``
while it is idle.

A daemon thread still inside the model when the interpreter finalizes aborts the process
("terminate called without an active exception": torch's GIL release cannot run then), so
at exit the process waits up to ``EXIT_GRACE_S`` for the calls under way to end.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

EXIT_GRACE_S = 30.0

log = logging.getLogger(__name__)

_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any], asyncio.AbstractEventLoop]


class ModelThread:
    def __init__(self, name: str) -> None:
        self.busy_since: float | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        _register(self)

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


_live: list[ModelThread] = []


def _register(thread: ModelThread) -> None:
    atexit.unregister(_wait_for_calls_under_way)  # registered last, it runs first (before torch's own)
    atexit.register(_wait_for_calls_under_way)
    _live[:] = [t for t in _live if t._thread.is_alive()] + [thread]


def _wait_for_calls_under_way() -> None:
    """Join every model thread: a busy one (up to the grace) and an idle one too, whose
    exit (torch's thread-local teardown) would otherwise race the interpreter's."""
    start = time.monotonic()
    for thread in _live:
        thread.close()
    for thread in _live:  # a call that ends within a second (a failed load, say) is not worth a line
        thread._thread.join(max(0.0, start + 1.0 - time.monotonic()))
    if any(t._thread.is_alive() and not t.idle for t in _live):
        log.info("waiting up to %.0f s for the model call under way to end", EXIT_GRACE_S)
    for thread in _live:
        thread._thread.join(max(0.0, start + EXIT_GRACE_S - time.monotonic()))
        if thread._thread.is_alive():
            log.warning("exiting with a model call still under way; the process may abort")

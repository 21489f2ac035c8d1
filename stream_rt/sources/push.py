"""A source fed by the program itself: a robot's control loop, a custom driver.

``source.push(rgb)`` from any thread (or from the event loop) hands over one RGB frame
(``(height, width, 3)`` uint8; the array is not copied, so do not write to it afterwards);
``source.close()`` ends the stream, and a ``push()`` after it raises RuntimeError. Media
time is the time of the push unless ``pts_ns`` is given. The luma plane is computed in
the pushing thread, so the event loop only hands frames on. When the graph is behind, at
most ``max_pending`` frames wait and the oldest are dropped (counted as
``frames_dropped``): a robot wants the newest view, not a backlog. A program that pushes
nothing for ``stall_timeout_s`` makes the source ``offline`` (its episode ends, its
questions are asked about the last frame); the next frame brings it back ``online``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from stream_rt.graph.node import Context
from stream_rt.graph.packets import SourceStatus, VideoFrame
from stream_rt.media.images import rgb_luma
from stream_rt.sources.av_decode import PtsSanitiser
from stream_rt.sources.status import StatusSource

_END = object()


class PushSource(StatusSource):
    """A source fed by the program: :meth:`push` RGB frames from any thread, :meth:`close`
    to end the stream. Outputs ``video`` (:class:`VideoFrame`) and ``status``; at most
    ``max_pending`` frames wait (the oldest are dropped and counted); nothing pushed for
    ``stall_timeout_s`` makes it ``offline`` until the next frame."""

    outputs = {"video": (VideoFrame,), "status": (SourceStatus,)}

    def __init__(self, name: str, *, max_pending: int = 4, stall_timeout_s: float = 10.0) -> None:
        super().__init__(name, has_video=True, has_audio=False)
        self.description = "frames pushed by the program"
        self._pending: deque[object] = deque()
        self._max_pending = max_pending
        self.stall_timeout_s = stall_timeout_s
        self._lock = threading.Lock()
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_ns = time.monotonic_ns()
        self._closed = False
        self.dropped = 0

    def push(self, rgb: npt.NDArray[np.uint8], pts_ns: int | None = None) -> None:
        """Hand over one frame (thread-safe): ``rgb`` is ``(height, width, 3)`` uint8, not
        copied (do not write to it afterwards); ``pts_ns``: its media time, by default the
        time of the push. Raises ValueError for another shape or type, RuntimeError once
        :meth:`close` was called."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"push() takes (height, width, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
        pts = time.monotonic_ns() - self._started_ns if pts_ns is None else pts_ns
        self._put((pts, rgb, rgb_luma(rgb)))

    def close(self) -> None:
        """End the stream (thread-safe): frames already pushed are still delivered; a second
        call does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending.append(_END)
        self._wake()

    def _put(self, item: object) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"push() after close(): the stream of '{self.name}' has ended")
            self._pending.append(item)
            while len(self._pending) > self._max_pending and self._pending[0] is not _END:
                self._pending.popleft()
                self.dropped += 1
        self._wake()

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wakeup.set)

    async def run(self, ctx: Context) -> None:
        self._loop = asyncio.get_running_loop()
        await self.set_state(ctx, "online", self.description)
        sanitiser = PtsSanitiser()
        seq = 0
        while not ctx.stopping.is_set():
            with self._lock:
                item = self._pending.popleft() if self._pending else None
                ctx.counters["frames_dropped"] = self.dropped
            if item is None:
                self._wakeup.clear()
                if not self._pending:
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), self.stall_timeout_s)
                    except TimeoutError:
                        await self.set_state(ctx, "offline", f"no frame pushed for {self.stall_timeout_s:g} s")
                continue
            if item is _END:
                self.end(ctx)
                return
            await self.set_state(ctx, "online", self.description)
            assert isinstance(item, tuple)
            pts, rgb, y = item
            frame = VideoFrame(self.name, seq, sanitiser(pts, 1), ctx.clock.wall_ns(), y, _constant(rgb))
            seq += 1
            self.frame_rate.tick(ctx.clock.now_ns())
            self.position_s = frame.pts_ns / 1e9
            await ctx.emit("video", frame)
            ctx.count("frames")


def _constant(rgb: npt.NDArray[np.uint8]) -> Callable[[], npt.NDArray[np.uint8]]:
    return lambda: rgb

"""Clocks: the only place stream_rt reads time.

One clock object per graph. Nodes ask it for ``now_ns()`` (monotonic, for timeouts and
rates; ``now_s()`` is the same in seconds), ``wall_ns()`` (for packet stamps) and
``sleep()``; replayed sources ask it to ``pace()`` media time.

- :class:`RealtimeClock`: live sources; ``pace()`` never waits.
- :class:`ReplayClock`: plays recorded media at ``speed`` x real time, or as fast as
  possible (``speed=None``).
- :class:`ManualClock`: tests; time moves only when :meth:`ManualClock.advance` is called.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time


class Clock:
    """Real time. Subclasses change how media time is paced or how time passes."""

    paces = False
    """True if :meth:`pace` may wait (sources skip the call otherwise)."""

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def now_s(self) -> float:
        """:meth:`now_ns` in seconds (for what takes a ``Callable[[], float]`` clock)."""
        return self.now_ns() / 1e9

    def wall_ns(self) -> int:
        return time.time_ns()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def pace(self, source_id: str, pts_ns: int) -> None:
        """Wait until media time ``pts_ns`` of ``source_id`` is due (no wait by default)."""


class RealtimeClock(Clock):
    """For live sources: media arrives in real time on its own, so nothing is paced."""


class ReplayClock(Clock):
    """Paces each source's media time against the monotonic clock.

    The first packet of a source anchors its media time to now; later packets wait until
    ``(pts - first_pts) / speed`` has elapsed. ``speed=None`` means as fast as possible.
    A jump back in media time (a restarted source) re-anchors instead of racing ahead.
    """

    def __init__(self, speed: float | None = 1.0) -> None:
        if speed is not None and speed <= 0:
            raise ValueError(f"replay speed must be > 0 (or None for as fast as possible), got {speed}")
        self.speed = speed
        self.paces = speed is not None
        self._anchors: dict[str, tuple[int, int]] = {}

    async def pace(self, source_id: str, pts_ns: int) -> None:
        if self.speed is None:
            return
        now = self.now_ns()
        anchor = self._anchors.get(source_id)
        if anchor is None or pts_ns < anchor[1]:
            self._anchors[source_id] = (now, pts_ns)
            return
        due = anchor[0] + int((pts_ns - anchor[1]) / self.speed)
        if due > now:
            await self.sleep((due - now) / 1e9)


class ManualClock(Clock):
    """A clock for tests: time stands still until :meth:`advance` moves it.

    ``sleep()`` waits until the clock has been advanced past its deadline, so time-based
    behaviour (timeouts, backoff, rate limits) is tested instantly and deterministically.
    """

    def __init__(self, start_ns: int = 0, wall_start_ns: int = 1_700_000_000_000_000_000) -> None:
        self._now = start_ns
        self._wall_offset = wall_start_ns - start_ns
        self._sleepers: list[tuple[int, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()

    def now_ns(self) -> int:
        return self._now

    def wall_ns(self) -> int:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        deadline = self._now + max(0, int(seconds * 1e9))
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._counter), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline has passed, in order."""
        target = self._now + int(seconds * 1e9)
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not future.done():
                future.set_result(None)
            # let the woken task run before later deadlines fire
            for _ in range(5):
                await asyncio.sleep(0)
        self._now = target
        await asyncio.sleep(0)

    @property
    def pending_sleepers(self) -> int:
        return sum(1 for _, _, f in self._sleepers if not f.done())

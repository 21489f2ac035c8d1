"""The graph's clock as the stage's parts read it: the parts are built with the stage, the
graph hands its clock over only when the stage starts (``ctx.clock``)."""

from __future__ import annotations

from stream_rt.graph.clock import Clock, RealtimeClock


class GraphClock(Clock):
    """Every reading goes to the clock the stage was started with (:meth:`use`); before
    that, real time (a stage asked for its health before it runs)."""

    def __init__(self) -> None:
        self._clock: Clock = RealtimeClock()

    def use(self, clock: Clock) -> None:
        self._clock = clock

    def now_ns(self) -> int:
        return self._clock.now_ns()

    def wall_ns(self) -> int:
        return self._clock.wall_ns()

    async def sleep(self, seconds: float) -> None:
        await self._clock.sleep(seconds)

"""Standing watches as the stage keeps them: expired on the graph's clock twice a second,
told every answer, and each transition published on the stage's ``watches`` output."""

from __future__ import annotations

import asyncio
import logging

from stream_rt.graph.clock import Clock
from stream_rt.graph.node import Context, describe_error
from stream_rt.graph.packets import MllmAnswer
from stream_rt.policies.watches import WatchBook

log = logging.getLogger("stream_rt.mllm")

WATCH_TICK_S = 0.5


class WatchTicker:
    def __init__(self, watches: WatchBook, clock: Clock) -> None:
        self.watches = watches
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self, ctx: Context) -> None:
        self._task = asyncio.create_task(self._tick(ctx))

    async def stop(self, ctx: Context) -> None:
        """Stop ticking, and publish what a command changed just before the stop."""
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        await self.publish(ctx)

    async def observe(self, answer: MllmAnswer, ctx: Context) -> None:
        """``answer`` went out: the watches of its source learn what it said."""
        self.watches.observe(answer)
        await self.publish(ctx)

    async def publish(self, ctx: Context) -> None:
        for transition in self.watches.take():
            ctx.count(f"watch_{transition.state}", source=transition.source_id)
            await ctx.emit("watches", transition)

    async def _tick(self, ctx: Context) -> None:
        """Expire watches and publish what commands and the clock changed, twice a second."""
        while True:
            try:
                self.watches.expire()
            except Exception as exc:  # a watch restored with bad values: said, and the clock goes on
                log.error("watches: cannot expire: %s", describe_error(exc))
            await self.publish(ctx)
            await self.clock.sleep(WATCH_TICK_S)

"""When the stage's model calls run: up to ``max_in_flight`` at once, the next taken fairly
across sources by :class:`~stream_rt.policies.flow.FairFlow` on the graph's clock (asked
questions first, each source's routine request replaced by a newer one with
``flow = "latest"``, routine calls beyond ``calls_per_minute`` refused), or with
``flow = "block"`` a newer request waiting for room. Each call runs on a task of its own,
which the scheduler keeps until it ends or the stage stops."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine
from typing import Any

from stream_rt.graph.clock import Clock
from stream_rt.graph.packets import MllmRequest
from stream_rt.graph.waits import first_of
from stream_rt.policies.flow import FairFlow


@dataclasses.dataclass(eq=False)  # the flow finds it by identity
class Queued:
    request: MllmRequest
    queued_ns: int  # the graph clock's now_ns() when it was queued
    answered: bool = False  # its answer is on its way out


Items = tuple[list[Queued], list[Queued]]  # (to start now, refused by the budget)


class CallScheduler:
    def __init__(self, max_in_flight: int, calls_per_minute: int, block: bool, clock: Clock) -> None:
        self.flow: FairFlow[Queued] = FairFlow(max_in_flight, calls_per_minute, clock=clock.now_s)
        self.calls_per_minute = calls_per_minute
        self.block = block
        self.clock = clock
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False  # nothing new starts
        self.idle = asyncio.Event()  # set while nothing is in flight or waiting
        self.idle.set()
        self._room = asyncio.Event()  # set whenever nothing waits

    @property
    def busy(self) -> bool:
        return bool(self.flow.in_flight or self.flow.queued)

    def begin(self) -> None:
        """The stage (re)starts: calls may start again."""
        self.stopping = False

    async def room(self, stopping: asyncio.Event) -> bool:
        """With ``flow = "block"``, wait until nothing waits (or the daemon stops); whether a
        request may be queued (not: the daemon is stopping and others still wait)."""
        while self.block and self.flow.queued and not stopping.is_set():
            self._room.clear()
            await first_of(self._room.wait(), stopping.wait())
        return not (stopping.is_set() and self.block and self.flow.queued)

    def offer(self, request: MllmRequest, asked: bool) -> tuple[list[Queued], Queued | None, list[Queued]]:
        """Queue ``request`` (``asked``: a question someone asked): (to start now, the
        waiting one of its source it replaced, refused by the budget)."""
        self.idle.clear()
        return self.flow.offer(request.source_id, Queued(request, self.clock.now_ns()), asked)

    def launch(self, started: list[Queued], call: Callable[[Queued], Coroutine[Any, Any, None]], name: str) -> None:
        """Run ``call`` for each ``started`` item on a task of its own."""
        for item in started:
            task = asyncio.create_task(call(item), name=name)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def done(self, item: Queued) -> Items:
        """``item``'s call ended: what starts now, what the budget refused (nothing once
        stopping: the item stays in the flow, answered at the stop if owed)."""
        if self.stopping:
            return [], []
        started, refused = self.flow.done(item)
        self._room.set()
        return started, refused

    def settle(self) -> None:
        """Nothing in flight or waiting any more: whoever waits for room or idleness goes on."""
        if not self.busy:
            self.release()

    def release(self) -> None:
        self._room.set()
        self.idle.set()

    async def stop(self) -> list[MllmRequest]:
        """Cancel every call under way; the requests still owed an answer (queued, or in
        flight and not answered)."""
        self.stopping = True
        while tasks := [task for task in self.tasks if not task.done()]:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()
        return [item.request for item in self.flow.clear() if not item.answered]

    def queued_s(self, item: Queued) -> float:
        """How long ``item`` has been queued, its call included."""
        return (self.clock.now_ns() - item.queued_ns) / 1e9

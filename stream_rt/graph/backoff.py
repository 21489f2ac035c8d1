"""Retry delays, and the one helper every reconnect loop keeps its place with.

A reconnect loop (a camera, an MQTT subscription, the MQTT sink, a node's supervised
restart) has one shape: try; on a failure wait longer each time, on the graph's clock;
after a success start again from the shortest wait. :class:`Backoff` says how long,
:class:`Retry` counts the failures and waits::

    retry = Retry(self.backoff, ctx.clock, self._rng)
    while True:
        try:
            async with connect() as link:
                retry.succeeded()
                ...
        except ConnectionError:
            await retry.pause()  # backoff.delay(failures so far), on the clock
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stream_rt.graph.clock import Clock


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: ``initial_s`` doubling up to ``max_s``, each scaled by a random
    factor in ``[1 - jitter, 1 + jitter]`` so a fleet does not reconnect in lockstep, and
    never more than ``max_s`` (jitter included: at the cap it only shortens the wait).

    The cap (10 s by default) is also how long a camera that came back can stay unseen."""

    initial_s: float = 0.5
    max_s: float = 10.0
    jitter: float = 0.2

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait after ``attempt`` failed attempts in a row (0: after the first)."""
        base = min(self.max_s, self.initial_s * 2.0 ** min(max(0, attempt), 64))  # 2**1024 overflows a float
        if not self.jitter:
            return float(base)
        rng = rng or _RNG
        delay = base * rng.uniform(1 - self.jitter, 1 + self.jitter)
        # At the cap the jitter spreads below it, so a fleet there does not reconnect in lockstep.
        return float(delay if delay <= self.max_s else self.max_s * rng.uniform(1 - self.jitter, 1))


_RNG = random.Random()


class Retry:
    """Where one reconnect loop stands: the failed attempts in a row, and the wait before
    the next attempt (``backoff``, slept on ``clock``, jitter drawn from ``rng``)."""

    def __init__(self, backoff: Backoff, clock: Clock, rng: random.Random | None = None) -> None:
        self.backoff = backoff
        self.clock = clock
        self.rng = rng
        self.failures = 0

    def succeeded(self) -> None:
        """The attempt worked (connected, delivered): the next failure waits the least."""
        self.failures = 0

    def failed(self) -> float:
        """Count a failed attempt; returns the wait before the next one."""
        delay = self.backoff.delay(self.failures, self.rng)
        self.failures += 1
        return delay

    async def pause(self) -> float:
        """Count a failed attempt and wait before the next one; returns the wait."""
        delay = self.failed()
        await self.clock.sleep(delay)
        return delay

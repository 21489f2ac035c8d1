"""Retry delays shared by everything that reconnects (sources, the MQTT sink)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: ``initial_s`` doubling up to ``max_s``, each scaled by a random
    factor in ``[1 - jitter, 1 + jitter]`` so a fleet does not reconnect in lockstep, and
    never more than ``max_s`` (jitter included: at the cap it only shortens the wait)."""

    initial_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.2

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.max_s, self.initial_s * 2.0 ** min(max(0, attempt), 64))  # 2**1024 overflows a float
        delay = base * rng.uniform(1 - self.jitter, 1 + self.jitter)
        # At the cap the jitter spreads below it, so a fleet there does not reconnect in lockstep.
        return float(delay if delay <= self.max_s else self.max_s * rng.uniform(1 - self.jitter, 1))

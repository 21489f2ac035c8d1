"""The call budget: how many model calls fit a minute, and how close together.

One :class:`CallBudget` is one budget over a sliding minute: at most ``per_minute`` calls
in any 60 s, and at least ``cooldown_s`` between two. The trigger keeps one per source
(routine calls of an episode: ``[trigger] max_calls_per_min``, ``cooldown_s``); the MLLM
stage's flow keeps one across sources (``[mllm] calls_per_minute``). Times are
nanoseconds on whatever clock the owner reads (media time for the trigger, the graph's
clock for the flow); the budget never reads a clock itself.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

WINDOW_NS = 60_000_000_000

Refusal = Literal["cooldown", "rate_limit"]


class CallBudget:
    def __init__(self, per_minute: float, cooldown_s: float = 0.0) -> None:
        """``per_minute`` <= 0: no limit on the rate."""
        self.per_minute = per_minute
        self.cooldown_ns = int(cooldown_s * 1e9)
        self.last_call_ns: int | None = None
        self._calls: deque[int] = deque()

    def refusal(self, now_ns: int) -> Refusal | None:
        """Why a call at ``now_ns`` does not fit, or ``None`` when it does."""
        if self.last_call_ns is not None and now_ns - self.last_call_ns < self.cooldown_ns:
            return "cooldown"
        while self._calls and now_ns - self._calls[0] >= WINDOW_NS:
            self._calls.popleft()
        if self.per_minute > 0 and len(self._calls) >= self.per_minute:
            return "rate_limit"
        return None

    def spend(self, now_ns: int) -> Refusal | None:
        """Record a call at ``now_ns`` if it fits; returns :meth:`refusal`'s answer."""
        refused = self.refusal(now_ns)
        if refused is None:
            self._calls.append(now_ns)
            self.last_call_ns = now_ns
        return refused

"""Flow limiting in front of an expensive stage, fair across sources.

MediaPipe's FlowLimiter keeps one call in flight and one item waiting, replaced by a newer
one because by the time the model is free the newer picture is the one worth asking
about. With many cameras in front of one model, that lets a busy camera's requests replace
a quiet one's. Here each source keeps its own waiting place (a newer routine item of a
source replaces only that source's), up to ``max_in_flight`` items run at once (a server
that batches answers several together), and the next to run is taken round-robin by
source: priority items first (questions someone asked, each already promised an answer,
never replaced; whoever offers them bounds how many there are), then routine ones. With
``per_minute``, routine items start only while fewer than that many started in the last
minute (a :class:`~stream_rt.policies.budget.CallBudget` across sources); one that would
start beyond it is refused (returned, to be answered as such).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from stream_rt.policies.budget import CallBudget

T = TypeVar("T")


class FairFlow(Generic[T]):
    def __init__(
        self, max_in_flight: int = 1, per_minute: int = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_in_flight < 1 or per_minute < 0:
            raise ValueError("flow: need max_in_flight >= 1 and per_minute >= 0")
        self.max_in_flight = max_in_flight
        self.per_minute = per_minute
        self.in_flight: list[T] = []
        self._clock = clock
        self._waiting: dict[str, T] = {}
        self._priority: dict[str, deque[T]] = {}
        self._turns: list[str] = []  # sources with something queued, in the order they queued it
        self._served_at: dict[str, int] = {}  # when each source last had its turn (a count of turns)
        self._turn_count = 0
        self._budget = CallBudget(per_minute)

    @property
    def queued(self) -> int:
        """Items waiting (not in flight)."""
        return len(self._waiting) + sum(len(q) for q in self._priority.values())

    def offer(self, source: str, item: T, priority: bool = False) -> tuple[list[T], T | None, list[T]]:
        """Queue ``item`` of ``source``: (the items to start now, the waiting item of that
        source it replaced, the items the budget refused) — each replaced or refused item
        to be answered."""
        replaced = None
        if priority:
            self._priority.setdefault(source, deque()).append(item)
        else:
            replaced = self._waiting.get(source)
            self._waiting[source] = item
        if source not in self._turns:
            self._turns.append(source)
        started, refused = self._start()
        return started, replaced, refused

    def done(self, item: T) -> tuple[list[T], list[T]]:
        """``item`` finished: (the items to start now, the items the budget refused)."""
        self.in_flight.remove(item)
        return self._start()

    def clear(self) -> list[T]:
        """Forget every item (in flight first, then in the order they would have run)."""
        items = list(self.in_flight)
        for source in self._turns:
            items += list(self._priority.get(source, ()))
        items += [self._waiting[s] for s in self._turns if s in self._waiting]
        self.in_flight.clear()
        self._waiting.clear()
        self._priority.clear()
        self._turns.clear()
        return items

    def _start(self) -> tuple[list[T], list[T]]:
        started: list[T] = []
        refused: list[T] = []
        while len(self.in_flight) < self.max_in_flight:
            source = self._next_turn([s for s in self._turns if self._priority.get(s)])
            if source is not None:
                item = self._priority[source].popleft()
            else:
                source = self._next_turn([s for s in self._turns if s in self._waiting])
                if source is None:
                    break
                item = self._waiting.pop(source)
                if self.per_minute and self._budget.spend(int(self._clock() * 1e9)) is not None:
                    refused.append(item)
                    self._served(source)
                    continue
            self._served(source)
            self.in_flight.append(item)
            started.append(item)
        return started, refused

    def _next_turn(self, sources: list[str]) -> str | None:
        """Of ``sources`` (in the order they queued), the one served longest ago (never first)."""
        return min(sources, key=lambda s: self._served_at.get(s, -1), default=None)

    def _served(self, source: str) -> None:
        """``source`` had its turn: it stays in line only while it has items queued."""
        self._turn_count += 1
        self._served_at[source] = self._turn_count
        if source not in self._waiting and not self._priority.get(source):
            self._turns.remove(source)

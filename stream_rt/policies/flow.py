"""Flow limiting in front of an expensive stage (MediaPipe's FlowLimiter): one call in
flight; one routine item waits, and a newer one replaces it, because by the time the
model is free the newer picture is the one worth asking about. Priority items (questions
someone asked, each already promised an answer) wait in order ahead of it and are never
replaced; whoever offers them bounds how many there are."""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class FlowLimiter(Generic[T]):
    def __init__(self) -> None:
        self.in_flight: T | None = None
        self.waiting: T | None = None
        self.priority: deque[T] = deque()

    @property
    def queued(self) -> int:
        """Items waiting (not in flight)."""
        return len(self.priority) + (self.waiting is not None)

    def offer(self, item: T, priority: bool = False) -> tuple[bool, T | None]:
        """Offer a new item: (whether it may start now, the waiting item it replaced)."""
        if self.in_flight is None:
            self.in_flight = item
            return True, None
        if priority:
            self.priority.append(item)
            return False, None
        replaced, self.waiting = self.waiting, item
        return False, replaced

    def done(self) -> T | None:
        """The in-flight item finished; returns the next one, now in flight, if any."""
        if self.priority:
            self.in_flight = self.priority.popleft()
        else:
            self.in_flight, self.waiting = self.waiting, None
        return self.in_flight

    def clear(self) -> list[T]:
        """Forget every item (in flight first, then in the order they would have run)."""
        items = [i for i in (self.in_flight, *self.priority, self.waiting) if i is not None]
        self.in_flight, self.waiting = None, None
        self.priority.clear()
        return items

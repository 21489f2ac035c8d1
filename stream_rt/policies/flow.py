"""Flow limiting in front of an expensive stage (MediaPipe's FlowLimiter): at most one
call in flight and one waiting; a newer request replaces the waiting one, because by the
time the model is free the newer picture is the one worth asking about."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class FlowLimiter(Generic[T]):
    def __init__(self) -> None:
        self.in_flight: T | None = None
        self.waiting: T | None = None

    def offer(self, item: T) -> tuple[bool, T | None]:
        """Offer a new item: (whether it may start now, the waiting item it replaced)."""
        if self.in_flight is None:
            self.in_flight = item
            return True, None
        replaced, self.waiting = self.waiting, item
        return False, replaced

    def done(self) -> T | None:
        """The in-flight item finished; returns the waiting one, now in flight, if any."""
        self.in_flight, self.waiting = self.waiting, None
        return self.in_flight

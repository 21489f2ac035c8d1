"""Bounded channels: the edges of a graph, each with a named queue policy.

Policies decide what happens to a *data* packet that arrives when the channel already
holds ``capacity`` data packets:

- ``block``: the producer waits for room (nothing is dropped),
- ``drop_oldest``: the oldest queued data packet is dropped,
- ``drop_newest``: the arriving packet is dropped,
- ``latest``: one slot, overwritten (``drop_oldest`` with capacity 1).

Control packets are always queued, in order, whatever the policy and fill level. A
:class:`~stream_rt.graph.packets.Flush` discards the data packets queued ahead of it.
Every drop is counted by reason.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

from stream_rt.graph.packets import ControlPacket, Flush, Packet

Policy = Literal["block", "drop_oldest", "drop_newest", "latest"]
POLICIES: tuple[Policy, ...] = ("block", "drop_oldest", "drop_newest", "latest")


@dataclass(frozen=True)
class ChannelStats:
    """A snapshot of one channel (:meth:`Channel.statistics`): its policy and capacity, how
    many packets wait (``depth``) and the most that ever did (``high_water``), how many were
    put and delivered, and the drops counted by reason."""

    name: str
    policy: Policy
    capacity: int
    depth: int
    high_water: int
    put: int
    delivered: int
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class Channel:
    """A single-consumer bounded FIFO of packets living on one event loop.

    ``on_ready`` is called (synchronously) whenever a packet becomes available, so a
    consumer reading several channels can wait on one event.
    """

    def __init__(self, name: str, policy: Policy = "block", capacity: int = 8) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown channel policy {policy!r}; use one of {', '.join(POLICIES)}")
        if capacity < 1:
            raise ValueError(f"channel {name}: capacity must be >= 1, got {capacity}")
        self.name = name
        self.policy: Policy = policy
        self.capacity = 1 if policy == "latest" else capacity
        self._queue: deque[Packet] = deque()
        self._data_count = 0
        self._room = asyncio.Event()
        self._room.set()
        self.on_ready: list[asyncio.Event] = []
        self._put = 0
        self._delivered = 0
        self._high_water = 0
        self._dropped: Counter[str] = Counter()
        self.closed = False

    @property
    def has_room(self) -> bool:
        """True if :meth:`put` of a data packet would not wait now."""
        return self.policy != "block" or self._data_count < self.capacity or self.closed

    async def put(self, packet: Packet) -> None:
        """Queue ``packet``; waits only under the ``block`` policy while the channel is full."""
        if self.policy == "block" and not isinstance(packet, ControlPacket):
            while self._data_count >= self.capacity and not self.closed:
                self._room.clear()
                await self._room.wait()
        self.put_nowait(packet)

    def put_nowait(self, packet: Packet) -> None:
        """Queue ``packet`` without waiting, applying the drop policy (``block`` drops nothing
        here: it may exceed capacity, so call :meth:`put` where waiting is possible)."""
        self._put += 1
        if self.closed:
            if not isinstance(packet, ControlPacket):
                self._dropped["closed"] += 1
            return
        if isinstance(packet, Flush):
            self._discard_data("flush")
        elif not isinstance(packet, ControlPacket) and self._data_count >= self.capacity:
            if self.policy == "drop_newest":
                self._dropped["drop_newest"] += 1
                return
            if self.policy in ("drop_oldest", "latest"):
                self._drop_oldest_data()
        self._queue.append(packet)
        if not isinstance(packet, ControlPacket):
            self._data_count += 1
        self._high_water = max(self._high_water, len(self._queue))
        for event in self.on_ready:
            event.set()

    def get_nowait(self) -> Packet | None:
        """The next packet, or ``None`` if the channel is empty."""
        if not self._queue:
            return None
        packet = self._queue.popleft()
        if not isinstance(packet, ControlPacket):
            self._data_count -= 1
            if self._data_count < self.capacity:
                self._room.set()
        self._delivered += 1
        return packet

    def close(self) -> None:
        """The consumer has ended: later packets are discarded (data counted as ``closed``
        drops) and producers waiting for room are released."""
        self.closed = True
        self._room.set()

    def statistics(self) -> ChannelStats:
        return ChannelStats(
            name=self.name,
            policy=self.policy,
            capacity=self.capacity,
            depth=len(self._queue),
            high_water=self._high_water,
            put=self._put,
            delivered=self._delivered,
            dropped=dict(self._dropped),
        )

    def _drop_oldest_data(self) -> None:
        for i, queued in enumerate(self._queue):
            if not isinstance(queued, ControlPacket):
                del self._queue[i]
                self._data_count -= 1
                self._dropped[self.policy] += 1
                return

    def _discard_data(self, reason: str) -> None:
        kept = [p for p in self._queue if isinstance(p, ControlPacket)]
        self._dropped[reason] += len(self._queue) - len(kept)
        self._queue = deque(kept)
        self._data_count = 0
        self._room.set()

"""The base of every packet: who made it, its number, its media time and its wall time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Packet:
    """The base of every packet: ``source_id`` (the source it comes from or is about),
    ``seq`` (monotonic per source), ``pts_ns`` (media time, monotonic per source and kind;
    -1 for control packets made outside the media flow) and ``wall_ns`` (the graph clock's
    wall time when it was made). Frozen: share it, never change it."""

    source_id: str
    seq: int
    pts_ns: int
    wall_ns: int

    def to_record(self) -> dict[str, Any]:
        """A JSON-serialisable summary (no pixel or sample data) for logs and sinks."""
        return {
            "kind": type(self).__name__,
            "source_id": self.source_id,
            "seq": self.seq,
            "pts_ns": self.pts_ns,
            "wall_ns": self.wall_ns,
        }


@dataclass(frozen=True, slots=True)
class ControlPacket(Packet):
    """Base of packets that steer the graph. Never dropped by a channel policy or a flush."""

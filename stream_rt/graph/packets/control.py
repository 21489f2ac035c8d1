"""Control packets: they steer the graph and are never dropped by a channel policy or a flush."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from stream_rt.graph.packets.base import ControlPacket, Packet


@dataclass(frozen=True, slots=True)
class _Ended(ControlPacket):
    """The end of ``source_id``'s stream, and why (``reason``: ``eof``, ``stopped``,
    ``failed``...). Written once; its two kinds below say how far the end reaches."""

    reason: str = "eof"

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record["reason"] = self.reason
        return record


@dataclass(frozen=True, slots=True)
class EndOfStream(_Ended):
    """The end of an edge: nothing more comes on it (the source's file ended, or the node
    that sends it has ended or is stopping). A node ends once each of its inputs has
    delivered one; the graph sends it on every output of a node that ends."""


@dataclass(frozen=True, slots=True)
class StreamEnded(_Ended):
    """One source's stream ended, on an edge that goes on carrying other sources. A node
    that serves several sources (change detection, audio analysis, fusion) sees a source's
    end as the end of one of its inputs; it emits this after that source's last output, so
    the nodes after it can close the source (its episode, its questions) without waiting
    for every other source to end."""


@dataclass(frozen=True, slots=True)
class Flush(ControlPacket):
    """Discard queued data packets ahead of this one in every channel it passes."""


@dataclass(frozen=True, slots=True)
class SourceStatus(ControlPacket):
    """A source went online or offline (``detail`` says why, in one line). ``streams``
    names the kinds of media the source delivers while online (``"video"``, ``"audio"``),
    so consumers know what to wait for; empty when the source does not know."""

    state: Literal["online", "offline"] = "online"
    detail: str = ""
    streams: tuple[str, ...] = ()

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record.update(state=self.state, detail=self.detail, streams=list(self.streams))
        return record

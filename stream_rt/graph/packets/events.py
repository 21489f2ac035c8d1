"""Event packets: episodes and asks the trigger opens, and standing watches' transitions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from stream_rt.graph.packets.base import Packet
from stream_rt.graph.packets.media import VideoFrame
from stream_rt.graph.packets.perception import Box, DetectedObject, Word


@dataclass(frozen=True, slots=True)
class Event(Packet):
    """An episode of salient activity: ``new`` when it opens, ``update`` while it lasts
    (rate-limited), ``end`` when it closes. ``pts_ns`` is the media time of this event,
    ``start_pts_ns``/``end_pts_ns`` bound the episode (``end_pts_ns`` only on ``end``).
    ``call_model``: the trigger policy would ask the MLLM about this event (budget allowing).
    An ``ask`` event carries a ``question`` someone asked about the source (the MQTT
    ``ask`` command); it is outside any episode and always calls the model. A ``check``
    event re-checks a source's unmet standing watch outside any episode (every
    ``recheck_s``, budget permitting; successive checks share an id). ``zones``: the
    zones the activity touched; ``objects``: the objects in view (with the object gate);
    ``words``: what was said in the episode up to this event (with transcription on).
    """

    type: Literal["new", "update", "end", "ask", "check"]
    event_id: str
    start_pts_ns: int
    end_pts_ns: int | None
    score: float
    peak_score: float
    components: dict[str, float]
    regions: tuple[Box, ...]
    call_model: bool
    reason: str = ""
    question: str | None = None
    snapshot_jpeg: bytes | None = field(default=None, repr=False, compare=False)
    frame: VideoFrame | None = field(default=None, repr=False, compare=False)
    zones: tuple[str, ...] = ()
    objects: tuple[DetectedObject, ...] = ()
    words: tuple[Word, ...] = ()

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record.update(
            type=self.type,
            event_id=self.event_id,
            start_pts_ns=self.start_pts_ns,
            end_pts_ns=self.end_pts_ns,
            score=round(self.score, 4),
            peak_score=round(self.peak_score, 4),
            components={k: round(v, 4) for k, v in self.components.items()},
            regions=[list(box) for box in self.regions],
            call_model=self.call_model,
            reason=self.reason,
            question=self.question,
            snapshot_bytes=len(self.snapshot_jpeg) if self.snapshot_jpeg else 0,
            zones=list(self.zones),
            objects=[o.to_record() for o in self.objects],
            transcript=" ".join(w.text for w in self.words),
            words=[w.to_record() for w in self.words],
        )
        return record


@dataclass(frozen=True, slots=True)
class WatchState(Packet):
    """A standing watch's transition (:mod:`stream_rt.policies.watches`): ``state`` is
    ``unmet`` or ``met`` (``reason`` ``set`` when it was set, ``answers`` when the model's
    answers flipped it), ``expired`` or ``removed``; ``since_ns`` (wall clock) when it took
    that state; ``event_id`` and ``summary`` of the answer that made the last flip."""

    watch_id: str
    state: str
    since_ns: int
    event_id: str
    summary: str
    condition: str
    reason: str

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record.update(watch_id=self.watch_id, state=self.state, since_ns=self.since_ns, event_id=self.event_id,
                      summary=self.summary, condition=self.condition, reason=self.reason)  # fmt: skip
        return record

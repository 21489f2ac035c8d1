"""Every kind of packet that flows through a stream_rt graph.

Packets are small frozen dataclasses. Each carries:

- ``source_id``: the source that produced it (or that it is about),
- ``seq``: monotonic per source, shared by all packets a source emits,
- ``pts_ns``: media time in nanoseconds, sanitised to be monotonic per source and kind,
- ``wall_ns``: wall-clock time (from the graph's clock) when it was made.

Control packets made outside the media flow (status, end of stream) carry ``seq = -1``
and ``pts_ns = -1``.

Data packets may be dropped by a channel policy; :class:`ControlPacket` subclasses never are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

AUDIO_SAMPLE_RATE = 16_000
"""Sample rate of every :class:`AudioChunk`, in Hz (sources resample to it)."""


@dataclass(frozen=True, slots=True)
class Packet:
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
class VideoFrame(Packet):
    """One decoded video frame.

    ``y`` is the luma (Y) plane, shape ``(height, width)``, uint8. It is usually a view
    into the decoder's buffer (row stride = the plane's ``line_size``), so it is
    read-only by contract: copy it before writing. RGB is converted only on demand by
    :meth:`rgb`, because conversion costs more than decoding.
    """

    y: npt.NDArray[np.uint8]
    _to_rgb: Callable[[], npt.NDArray[np.uint8]] | None = field(default=None, repr=False, compare=False)
    _rgb_cache: list[npt.NDArray[np.uint8]] = field(default_factory=list, repr=False, compare=False)

    @property
    def width(self) -> int:
        return int(self.y.shape[1])

    @property
    def height(self) -> int:
        return int(self.y.shape[0])

    def rgb(self) -> npt.NDArray[np.uint8]:
        """The frame as an ``(height, width, 3)`` uint8 RGB array (converted once, cached)."""
        if not self._rgb_cache:
            rgb = np.repeat(self.y[:, :, None], 3, axis=2) if self._to_rgb is None else self._to_rgb()
            self._rgb_cache.append(rgb)
        return self._rgb_cache[0]

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record.update(width=self.width, height=self.height)
        return record


@dataclass(frozen=True, slots=True)
class AudioChunk(Packet):
    """Mono float32 samples in [-1, 1] at :data:`AUDIO_SAMPLE_RATE`; ``pts_ns`` is the first sample."""

    samples: npt.NDArray[np.float32]

    @property
    def duration_ns(self) -> int:
        return len(self.samples) * 1_000_000_000 // AUDIO_SAMPLE_RATE

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record.update(samples=len(self.samples), sample_rate=AUDIO_SAMPLE_RATE)
        return record


Box = tuple[int, int, int, int]
"""A rectangle in pixels: ``(x0, y0, x1, y1)``, x1/y1 exclusive."""


@dataclass(frozen=True, slots=True)
class DetectedObject:
    """An object the detector found and the tracker follows: its COCO ``label``, ``score``,
    ``box`` (pixels), ``track_id`` (the same while the tracker follows it), the ``zones``
    it stands in, and whether it is ``stationary`` (has not moved for a while: a parked
    car, a person standing still)."""

    label: str
    score: float
    box: Box
    track_id: int
    zones: tuple[str, ...] = ()
    stationary: bool = False

    def to_record(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "score": round(self.score, 3),
            "box": list(self.box),
            "track_id": self.track_id,
            "zones": list(self.zones),
            "stationary": self.stationary,
        }


@dataclass(frozen=True, slots=True)
class ChangeMap(Packet):
    """Where a frame differs from the running background, per ``patch x patch`` patch.

    ``mad``: mean absolute luma difference per patch (0..255), shape ``(rows, cols)``;
    ``changed``: patches above the threshold; ``regions``: bounding boxes of connected
    changed patches, largest first; ``recalibrated``: the background was reset to this
    frame (a cut, or a change of most of the frame the light model could not follow), so
    nothing counts as changed. ``zones``: the source's zones its regions (and objects)
    touched; ``objects``: what the object gate saw (when it runs).
    """

    patch: int
    mad: npt.NDArray[np.float32]
    changed: npt.NDArray[np.bool_]
    changed_fraction: float
    regions: tuple[Box, ...]
    recalibrated: bool
    frame: VideoFrame = field(repr=False, compare=False)
    zones: tuple[str, ...] = ()
    objects: tuple[DetectedObject, ...] = ()

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record.update(
            changed_fraction=round(self.changed_fraction, 5),
            regions=[list(box) for box in self.regions],
            recalibrated=self.recalibrated,
            zones=list(self.zones),
            objects=[o.to_record() for o in self.objects],
        )
        return record


@dataclass(frozen=True, slots=True)
class AudioFeatures(Packet):
    """Cheap features of one 32 ms audio window (``pts_ns`` is its start).

    ``level_dbfs``: RMS level; ``floor_dbfs``: the tracked noise floor; ``onset``:
    spectral-flux onset strength above its running mean, in standard deviations (0 when
    none); ``speech``: Silero VAD probability, or ``None`` when the cheap features said
    there was no sound worth checking (the VAD was skipped).
    """

    level_dbfs: float
    floor_dbfs: float
    onset: float
    speech: float | None

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record.update(
            level_dbfs=round(self.level_dbfs, 2),
            floor_dbfs=round(self.floor_dbfs, 2),
            onset=round(self.onset, 3),
            speech=None if self.speech is None else round(self.speech, 3),
        )
        return record


@dataclass(frozen=True, slots=True)
class Salience(Packet):
    """How worth a look the scene is at one time step, 0..1, with its parts.

    ``components`` holds each modality's own score (``visual``, ``speech``, ``onset``,
    ``loudness``), so an event can say why it fired. ``frame`` is the latest video frame
    (for snapshots and requests), ``regions`` its changed regions, ``zones`` the zones they
    touched, ``objects`` the objects in view.
    """

    score: float
    components: dict[str, float]
    regions: tuple[Box, ...] = ()
    frame: VideoFrame | None = field(default=None, repr=False, compare=False)
    zones: tuple[str, ...] = ()
    objects: tuple[DetectedObject, ...] = ()

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record.update(
            score=round(self.score, 4),
            components={k: round(v, 4) for k, v in self.components.items()},
            regions=[list(box) for box in self.regions],
            zones=list(self.zones),
            objects=[o.to_record() for o in self.objects],
        )
        return record


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
    zones the activity touched; ``objects``: the objects in view (with the object gate).
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
        )
        return record


@dataclass(frozen=True, slots=True)
class MllmRequest(Packet):
    """A question for the multimodal model about one event: the ``images`` (RGB, HxWx3
    uint8: the keyframe, then crops of its changed regions — or, for a clip, frames in
    time order with their ``frame_pts`` and the ``audio`` features of that span, which
    audio-guided compression uses), the ``question``, and a line of ``context`` (what the
    event is: times, salience). ``signature`` is a small summary of the scene, compared by
    answer reuse. ``memory``: the source's streaming-memory entries, which backends that
    can take them put before the prompt; ``summary_tokens``: how many pooled visual tokens
    of the keyframe the answer should carry back for the memory (0: none)."""

    event_id: str
    question: str
    images: tuple[npt.NDArray[np.uint8], ...] = field(default=(), repr=False, compare=False)
    context: str = ""
    signature: npt.NDArray[np.float32] | None = field(default=None, repr=False, compare=False)
    frame_pts: tuple[int, ...] = field(default=(), compare=False)
    audio: tuple[AudioFeatures, ...] = field(default=(), repr=False, compare=False)
    memory: tuple[Any, ...] = field(default=(), repr=False, compare=False)  # MemoryEntry (the graph knows no memory)
    summary_tokens: int = 0

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record.update(
            event_id=self.event_id,
            question=self.question,
            context=self.context,
            images=[list(image.shape[:2]) for image in self.images],
            memory_entries=len(self.memory),
        )
        return record


AnswerStatus = Literal["ok", "invalid", "error", "timeout", "reused", "dropped"]


@dataclass(frozen=True, slots=True)
class MllmAnswer(Packet):
    """The model's answer to an :class:`MllmRequest`.

    ``status``: ``ok`` (``answer`` holds the validated answer contract), ``invalid`` (the
    model's text did not satisfy the contract; ``text`` has it), ``error`` / ``timeout``
    (the call failed; ``error`` says why), ``reused`` (the scene and question had not
    changed: the last answer, not a new call), ``dropped`` (a newer request replaced this
    one while it waited for the model). ``stop`` says why decoding ended
    (``contract``: the JSON answer was complete; ``eos``; ``max_tokens``). ``timings`` are
    seconds (``queued``, ``encode``, ``prefill``, ``decode``, ``total``), ``tokens`` counts
    (``prompt``, ``visual``, ``generated``). ``smoke``: the answer comes from the smoke
    model, whose random weights make it meaningless. ``visual_summary``: the keyframe's
    pooled visual tokens when the request asked for them (for the streaming memory; not
    published). ``repeat``: the answer says what the source's previous answer said, in the
    same episode (``confidence`` aside): not news, so notifications can skip it.
    ``frame_pts``: the media times of a clip's frames the model was shown, oldest first.
    """

    event_id: str
    question: str
    status: AnswerStatus
    answer: dict[str, Any] | None
    text: str
    model: str
    smoke: bool = False
    error: str = ""
    stop: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    exit_depth: float | None = None
    visual_summary: npt.NDArray[np.float32] | None = field(default=None, repr=False, compare=False)
    repeat: bool = False
    frame_pts: tuple[int, ...] = ()

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record.update(
            event_id=self.event_id,
            question=self.question,
            status=self.status,
            answer=self.answer,
            text=self.text,
            model=self.model,
            error=self.error,
            stop=self.stop,
            timings={k: round(v, 4) for k, v in self.timings.items()},
            tokens=dict(self.tokens),
            exit_depth=self.exit_depth,
            repeat=self.repeat,
        )
        if self.frame_pts:
            record["frame_pts_ns"] = list(self.frame_pts)
        if self.smoke:
            record["smoke"] = "smoke model with random weights: this answer is not meaningful"
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


@dataclass(frozen=True, slots=True)
class ControlPacket(Packet):
    """Base of packets that steer the graph. Never dropped by a channel policy or a flush."""


@dataclass(frozen=True, slots=True)
class EndOfStream(ControlPacket):
    """The source has no more packets (file ended, or the graph is stopping)."""

    reason: str = "eof"

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record["reason"] = self.reason
        return record


@dataclass(frozen=True, slots=True)
class StreamEnded(ControlPacket):
    """One source's stream ended. A node that serves several sources (change detection,
    audio analysis, fusion) sees a source's end as the end of one of its inputs; it emits
    this after that source's last output, so the nodes after it can close the source (its
    episode, its questions) without waiting for every other source to end."""

    reason: str = "eof"

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record["reason"] = self.reason
        return record


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

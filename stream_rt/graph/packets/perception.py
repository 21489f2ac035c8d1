"""Perception packets: what the gates make of the media (changes, audio features, objects,
what was said, salience)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_rt.graph.packets.base import Packet
from stream_rt.graph.packets.media import VideoFrame

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
class Word:
    """One recognised word: its ``text``, its ``start_ns``/``end_ns`` (media time, the
    clock of the source's ``pts_ns``) and the recogniser's ``confidence`` (0..1)."""

    text: str
    start_ns: int
    end_ns: int
    confidence: float

    def to_record(self) -> dict[str, Any]:
        return {"word": self.text, "start_ns": self.start_ns, "end_ns": self.end_ns,
                "confidence": round(self.confidence, 3)}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Transcript(Packet):
    """What was said in one stretch of speech the VAD found: ``pts_ns`` its start and
    ``end_ns`` its end (media time), the recognised ``words`` (each with its media times)
    and their ``text``, the ``engine`` that heard them and its ``language``. A stretch in
    which nothing was recognised has no words."""

    end_ns: int
    words: tuple[Word, ...]
    engine: str
    language: str

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record.update(end_ns=self.end_ns, text=self.text, words=[w.to_record() for w in self.words],
                      engine=self.engine, language=self.language)  # fmt: skip
        return record


ALL_TRANSCRIBED_NS = 2**62
"""The :class:`TranscribedUntil` mark of a source whose audio has ended: past every time."""


@dataclass(frozen=True, slots=True)
class TranscribedUntil(Packet):
    """Every stretch of speech of the source that began before ``pts_ns`` has been
    transcribed and its :class:`Transcript` sent: what waits for the words of a span
    (an event's) waits for this to pass the span's end."""

"""Clips for multi-frame requests: per source, the recent video frames sampled every
``interval_s`` and the audio features of the same span, so that an event can be asked
about together with the moments that led to it (and compressed by audio guidance,
:mod:`stream_rt.mllm.techniques.compression`).

The video reaches the stage on an edge of its own, usually ahead of the events (which pass
change detection, salience and the trigger first): the sampled frames and audio features of
``frames * interval_s`` seconds before the newest frame, plus :data:`LEAD_S` for that
lead, are kept per source, so that a clip is the same however far ahead the video ran.
The frames are converted to RGB only when a request is built. With ``sound``, the source's
audio chunks (16 kHz mono) of the same span are kept too, and a request carries the clip's
sound — from its first frame to the event — for a model that hears it (Qwen2.5-Omni, Qwen3-Omni).

The two edges are taken in turn, so a backlog of video (while a call blocks) can also let
an event overtake the frames before it: :class:`OvertakenEvents` holds such an event until
a frame of its time, or the end of its video, reaches the stage.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from stream_rt.graph.packets import AUDIO_SAMPLE_RATE, AudioChunk, AudioFeatures, Event, MllmRequest, VideoFrame
from stream_rt.media.images import resize
from stream_rt.mllm.prompt import context_line
from stream_rt.mllm.stage.requests import build_request

LEAD_S = 2.0
"""How far ahead of the events the video may run and still leave every event its clip."""


@dataclass
class _Recent:
    frames: deque[VideoFrame]
    audio: deque[AudioFeatures]
    sound: deque[AudioChunk] = field(default_factory=deque)


class ClipBuffer:
    def __init__(self, frames: int = 8, interval_s: float = 0.5, sound: bool = False) -> None:
        """``frames`` per clip, one every ``interval_s``; ``sound``: keep the audio chunks
        too, so requests carry the clip's sound."""
        if frames < 2:
            raise ValueError(f"a clip has at least 2 frames, got {frames}")
        self.frames = frames
        self.sound = sound
        self.interval_ns = int(interval_s * 1e9)
        self.span_ns = self.frames * self.interval_ns + int(LEAD_S * 1e9)
        self._recent: dict[str, _Recent] = {}
        self._latest: dict[str, int] = {}

    def _of(self, source_id: str) -> _Recent:
        recent = self._recent.get(source_id)
        if recent is None:
            recent = self._recent[source_id] = _Recent(deque(), deque())
        return recent

    def add_frame(self, frame: VideoFrame) -> None:
        frames = self._of(frame.source_id).frames
        self._latest[frame.source_id] = frame.pts_ns
        if not frames or frame.pts_ns - frames[-1].pts_ns >= self.interval_ns:
            frames.append(frame)
            while frames[0].pts_ns < frame.pts_ns - self.span_ns:
                frames.popleft()

    def latest_pts(self, source_id: str) -> int | None:
        """The time of the newest frame seen of ``source_id`` (sampled or not)."""
        return self._latest.get(source_id)

    def add_audio(self, features: AudioFeatures) -> None:
        audio = self._of(features.source_id).audio
        audio.append(features)
        horizon = features.pts_ns - self.span_ns
        while audio[0].pts_ns < horizon:
            audio.popleft()

    def add_sound(self, chunk: AudioChunk) -> None:
        """Keep ``chunk`` for the clips of its source (only with ``sound``)."""
        if not self.sound:
            return
        sound = self._of(chunk.source_id).sound
        sound.append(chunk)
        horizon = chunk.pts_ns - self.span_ns
        while sound[0].pts_ns + sound[0].duration_ns < horizon:
            sound.popleft()

    def sound_of(self, source_id: str, start_ns: int, end_ns: int) -> tuple[np.ndarray | None, int]:
        """(the source's samples from ``start_ns`` to ``end_ns``, where they begin), from the
        chunks kept; ``(None, start_ns)`` when none overlaps. A gap between chunks (a
        dropped chunk) is closed up, not filled."""
        pieces, begin = [], None
        for chunk in self._of(source_id).sound:
            end = chunk.pts_ns + chunk.duration_ns
            if end <= start_ns or chunk.pts_ns >= end_ns:
                continue
            first = max(0, (start_ns - chunk.pts_ns) * AUDIO_SAMPLE_RATE // 1_000_000_000)
            last = min(len(chunk.samples), -(-(end_ns - chunk.pts_ns) * AUDIO_SAMPLE_RATE // 1_000_000_000))
            if begin is None:
                begin = chunk.pts_ns + first * 1_000_000_000 // AUDIO_SAMPLE_RATE
            pieces.append(chunk.samples[first:last])
        if begin is None:
            return None, start_ns
        return np.concatenate(pieces).astype(np.float32, copy=False), begin

    def request(self, event: Event, question: str, max_side: int) -> MllmRequest:
        """The request for ``event``: the sampled frames before it, then its own frame."""
        assert event.frame is not None
        request = build_request(event, question, max_side=max_side, crop_regions=False)
        recent = self._of(event.source_id)
        before = [f for f in recent.frames if f.pts_ns < event.pts_ns - self.interval_ns // 2][-(self.frames - 1) :]
        frames = [*before, event.frame]
        start = frames[0].pts_ns
        sound, sound_pts = self.sound_of(event.source_id, start, event.pts_ns) if self.sound else (None, start)
        return replace(
            request,
            images=(*(resize(f.rgb(), max_side) for f in before), *request.images),
            context=context_line(event, start) if before else request.context,
            frame_pts=tuple(f.pts_ns for f in frames),
            audio=tuple(a for a in recent.audio if start <= a.pts_ns <= event.pts_ns),
            sound=sound,
            sound_pts_ns=sound_pts,
        )


class OvertakenEvents:
    """Events whose clip would miss frames, held in their order until their frames are in
    ``clip`` (the stage takes each in as :meth:`next_ready` lets it go)."""

    def __init__(self, clip: ClipBuffer) -> None:
        self.clip = clip
        self._held: list[Event] = []

    def overtook(self, event: Event) -> bool:
        """Whether ``event``'s clip would miss frames: its own frame is on the video edge
        still (or a newer one replaced it), or an event of its source is held already (the
        order is kept). A source none of whose video reached the stage has no clip to wait
        for; an event without a picture has no clip."""
        if event.frame is None:
            return False
        if any(held.source_id == event.source_id for held in self._held):
            return True
        latest = self.clip.latest_pts(event.source_id)
        return latest is not None and latest < event.pts_ns

    def hold(self, event: Event) -> None:
        self._held.append(event)

    def next_ready(self, ready: Callable[[Event], bool]) -> Event | None:
        """The first held event, of those first of their source, that is ``ready`` to go
        (no longer held); ``None`` when none is."""
        first: dict[str, Event] = {}  # per source, its oldest held event: only that one may go
        for held in self._held:
            first.setdefault(held.source_id, held)
        going = next((e for e in first.values() if ready(e)), None)
        if going is not None:
            self._held.remove(going)
        return going

    def take_all(self) -> list[Event]:
        """Every held event (the stage is stopping), none held any more."""
        held, self._held = self._held, []
        return held

"""Clips for multi-frame requests: per source, the recent video frames sampled every
``interval_s`` and the audio features of the same span, so that an event can be asked
about together with the moments that led to it (and compressed by audio guidance,
:mod:`stream_rt.mllm.compression`).

Only ``frames`` sampled frames (the one nearest the event may be too close to it to count)
and ``frames * interval_s`` seconds of audio features are kept per source; the frames are
converted to RGB only when a request is built.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

from stream_rt.graph.packets import AudioFeatures, Event, MllmRequest, VideoFrame
from stream_rt.mllm.requests import build_request, context_line, resize


@dataclass
class _Recent:
    frames: deque[VideoFrame]
    audio: deque[AudioFeatures]


class ClipBuffer:
    def __init__(self, frames: int = 8, interval_s: float = 0.5) -> None:
        if frames < 2:
            raise ValueError(f"a clip has at least 2 frames, got {frames}")
        self.frames = frames
        self.interval_ns = int(interval_s * 1e9)
        self._recent: dict[str, _Recent] = {}

    def _of(self, source_id: str) -> _Recent:
        recent = self._recent.get(source_id)
        if recent is None:
            recent = self._recent[source_id] = _Recent(deque(maxlen=self.frames), deque())
        return recent

    def add_frame(self, frame: VideoFrame) -> None:
        frames = self._of(frame.source_id).frames
        if not frames or frame.pts_ns - frames[-1].pts_ns >= self.interval_ns:
            frames.append(frame)

    def add_audio(self, features: AudioFeatures) -> None:
        audio = self._of(features.source_id).audio
        audio.append(features)
        horizon = features.pts_ns - self.frames * self.interval_ns
        while audio[0].pts_ns < horizon:
            audio.popleft()

    def request(self, event: Event, question: str, max_side: int) -> MllmRequest:
        """The request for ``event``: the sampled frames before it, then its own frame."""
        assert event.frame is not None
        request = build_request(event, question, max_side=max_side, crop_regions=False)
        recent = self._of(event.source_id)
        before = [f for f in recent.frames if f.pts_ns < event.pts_ns - self.interval_ns // 2][-(self.frames - 1) :]
        frames = [*before, event.frame]
        start = frames[0].pts_ns
        return replace(
            request,
            images=(*(resize(f.rgb(), max_side) for f in before), *request.images),
            context=context_line(event, start) if before else request.context,
            frame_pts=tuple(f.pts_ns for f in frames),
            audio=tuple(a for a in recent.audio if start <= a.pts_ns <= event.pts_ns),
        )

"""A deterministic source of generated frames and audio, for tests and load runs.

Frames show a static textured background with a bright square that moves while
``moving(t)`` says so; audio is a sine tone while ``sounding(t)`` says so, a quiet
room's noise (-60 dBFS, seeded) otherwise. Media time advances by exactly one frame period per frame, so what a test
expects can be computed from the arguments alone.

In a config it is a URL: ``synthetic:?frames=1000000&fps=10&width=64&height=48`` with
``active_s`` / ``period_s`` (the square moves and the tone sounds for the first
``active_s`` seconds of every ``period_s``; default: always moving, never sounding) and
``seed``; the source's ``audio`` setting decides whether it makes sound.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from stream_rt.config.sources import synthetic_parameters
from stream_rt.graph.node import Context
from stream_rt.graph.packets import AUDIO_SAMPLE_RATE, AudioChunk, SourceStatus, VideoFrame
from stream_rt.sources.status import StatusSource


class SyntheticSource(StatusSource):
    """A deterministic source of ``frames`` generated frames at ``fps`` (``None``: without
    end), and 16 kHz audio with ``audio``: a bright square moves while ``moving(t)``, a tone
    sounds while ``sounding(t)`` (``t`` in media seconds). Outputs ``video``, ``audio`` and
    ``status``; media time advances by exactly one frame period per frame."""

    outputs = {"video": (VideoFrame,), "audio": (AudioChunk,), "status": (SourceStatus,)}

    def __init__(
        self,
        name: str,
        *,
        frames: int | None = 100,
        fps: float = 10.0,
        width: int = 64,
        height: int = 48,
        audio: bool = False,
        moving: Callable[[float], bool] = lambda t: True,
        sounding: Callable[[float], bool] = lambda t: False,
        seed: int = 0,
    ) -> None:
        super().__init__(name, has_video=True, has_audio=audio)
        if fps <= 0 or width < 8 or height < 8:
            raise ValueError("synthetic source needs fps > 0 and a frame of at least 8x8")
        self.frames = frames
        self.fps = fps
        self.audio = audio
        self.moving = moving
        self.sounding = sounding
        rng = np.random.default_rng(seed)
        self._background = rng.integers(40, 120, size=(height, width), dtype=np.uint8)
        self._box = max(4, min(width, height) // 6)
        self.emitted = 0
        self.description = f"synthetic {width}x{height} at {fps:g} fps"
        self.duration_s = frames / fps if frames is not None else None

    @classmethod
    def from_url(cls, name: str, url: str, audio: bool = True) -> SyntheticSource:
        p = synthetic_parameters(url)
        active, period = p.pop("active_s", None), p.pop("period_s", None)
        if active is not None and period is not None:
            on: Callable[[float], bool] = lambda t: t % period < active  # noqa: E731
        else:
            on = lambda t: True  # noqa: E731
        return cls(
            name, frames=int(p.get("frames", 100)), fps=p.get("fps", 10.0), width=int(p.get("width", 64)),
            height=int(p.get("height", 48)), audio=audio, moving=on,
            sounding=on if active is not None else (lambda t: False), seed=int(p.get("seed", 0)),
        )  # fmt: skip

    def _frame(self, box_x: int) -> np.ndarray:
        y = self._background.copy()
        top = (self._background.shape[0] - self._box) // 2
        y[top : top + self._box, box_x : box_x + self._box] = 230
        return y

    async def run(self, ctx: Context) -> None:
        period_ns = int(1e9 / self.fps)
        samples_per_frame = round(AUDIO_SAMPLE_RATE / self.fps)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples_per_frame) / AUDIO_SAMPLE_RATE)).astype(np.float32)
        # Between tones, a quiet room (-60 dBFS of noise), as a microphone hears it.
        silence = (0.001 * np.random.default_rng(7).standard_normal(samples_per_frame)).astype(np.float32)
        span = self._background.shape[1] - self._box
        box_x = 0
        seq = itertools.count()
        indices = range(self.frames) if self.frames is not None else itertools.count()
        await self.set_state(ctx, "online", self.description)
        for index in indices:
            if ctx.stopping.is_set():
                return
            pts = index * period_ns
            t = pts / 1e9
            if self.moving(t):
                box_x = (box_x + 1) % (span + 1)
            await ctx.clock.pace(self.name, pts)
            frame = VideoFrame(self.name, next(seq), pts, ctx.clock.wall_ns(), self._frame(box_x))
            await ctx.emit("video", frame)
            self.frame_rate.tick(ctx.clock.wall_ns())
            self.position_s = t
            self.emitted += 1
            ctx.count("frames")
            if self.audio:
                samples = tone if self.sounding(t) else silence
                await ctx.emit("audio", AudioChunk(self.name, next(seq), pts, ctx.clock.wall_ns(), samples))
        self.end(ctx)

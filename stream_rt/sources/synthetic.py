"""A deterministic source of generated frames and audio, for tests and load runs.

Frames show a static textured background with a bright square that moves while
``moving(t)`` says so; audio is a sine tone while ``sounding(t)`` says so, silence
otherwise. Media time advances by exactly one frame period per frame, so what a test
expects can be computed from the arguments alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from stream_rt.graph.node import Context, Source
from stream_rt.graph.packets import AUDIO_SAMPLE_RATE, AudioChunk, VideoFrame


class SyntheticSource(Source):
    outputs = {"video": (VideoFrame,), "audio": (AudioChunk,)}

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
        super().__init__(name)
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

    def _frame(self, box_x: int) -> np.ndarray:
        y = self._background.copy()
        top = (self._background.shape[0] - self._box) // 2
        y[top : top + self._box, box_x : box_x + self._box] = 230
        return y

    async def run(self, ctx: Context) -> None:
        period_ns = int(1e9 / self.fps)
        samples_per_frame = round(AUDIO_SAMPLE_RATE / self.fps)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples_per_frame) / AUDIO_SAMPLE_RATE)).astype(np.float32)
        silence = np.zeros(samples_per_frame, np.float32)
        span = self._background.shape[1] - self._box
        box_x = 0
        seq = itertools.count()
        indices = range(self.frames) if self.frames is not None else itertools.count()
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
            self.emitted += 1
            ctx.count("frames")
            if self.audio:
                samples = tone if self.sounding(t) else silence
                await ctx.emit("audio", AudioChunk(self.name, next(seq), pts, ctx.clock.wall_ns(), samples))

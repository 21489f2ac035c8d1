"""Media generated on the fly with PyAV, for tests that need exact, known content."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def make_media(
    path: Path,
    *,
    frames: int = 50,
    fps: int = 25,
    size: tuple[int, int] = (160, 120),
    audio_rate: int | None = 44_100,
    audio_layout: str = "stereo",
    codec: str = "mpeg4",
    container: str | None = None,
) -> Path:
    """Encode a clip with PyAV: a moving gradient and (optionally) a 440 Hz tone."""
    width, height = size
    with av.open(str(path), "w", format=container) as out:
        video = out.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = out.add_stream("aac", rate=audio_rate, layout=audio_layout) if audio_rate else None
        xs = np.arange(width, dtype=np.int64)[None, :]
        for i in range(frames):
            img = np.repeat(((xs + 4 * i) % 256).astype(np.uint8), height, axis=0)
            rgb = np.stack([img, img[::-1], np.full_like(img, 128)], axis=2)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if audio is not None:
            total = int(audio_rate * frames / fps)
            channels = av.AudioLayout(audio_layout).nb_channels
            t = np.arange(total) / audio_rate
            tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            planar = np.repeat(tone[None, :], channels, axis=0)
            step = 1024
            for start in range(0, total, step):
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(planar[:, start : start + step]), format="fltp", layout=audio_layout
                )
                frame.sample_rate = audio_rate
                frame.pts = start
                out.mux(audio.encode(frame))
            out.mux(audio.encode(None))
    return path

"""What the benchmarks share: the bare PyAV decode loop they measure the graph against."""

from __future__ import annotations

import time
from pathlib import Path

import av


def bare_decode(clip: Path) -> tuple[int, float]:
    """Frames and seconds of a hand-written PyAV decode loop, threaded as the source is."""
    started = time.perf_counter()
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = sum(1 for _ in container.decode(stream))
    return frames, time.perf_counter() - started

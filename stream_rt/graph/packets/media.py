"""Media packets: what sources decode (video frames, audio chunks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_rt.graph.packets.base import Packet

AUDIO_SAMPLE_RATE = 16_000
"""Sample rate of every :class:`AudioChunk`, in Hz (sources resample to it)."""


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

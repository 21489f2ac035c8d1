"""The decode thread of an :class:`~stream_rt.sources.av_source.AvSource`.

One :class:`Decoder` is one connection: open the input with PyAV, demux, decode, and
hand packets to the loop through a :class:`ThreadBridge`. It runs in its own thread, puts
:class:`Opened` first and always ends by putting :class:`Ended` or :class:`Failed`, so the
loop side can tell a finished file from a lost stream. A packet that fails to decode is
reported as :class:`Corrupt` and skipped.

A file with both video and audio is read through one demuxer per stream (the file is
opened once per stream) and the decoded media are merged lowest media time first, so the
packets leave in the same order however the file interleaves its streams on disk: a
recorder may store audio seconds away from the video of the same time. A live input is
one connection and is read once, in arrival order.

Video frames carry the Y plane as a view into the decoder's buffer (row stride
``line_size``, read by :func:`stream_rt.media.images.y_plane`); RGB is converted only if asked.
Audio is resampled to 16 kHz mono float32.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from fractions import Fraction
from operator import itemgetter
from typing import Any, TypeAlias

import av
import numpy as np
import numpy.typing as npt
from av.stream import Discard

from stream_rt.graph.packets import AUDIO_SAMPLE_RATE, AudioChunk, VideoFrame
from stream_rt.media.images import y_plane
from stream_rt.sources.bridge import ThreadBridge


@dataclass(frozen=True)
class Opened:
    """The input is open: ``streams`` names the kinds being decoded (``"video"``,
    ``"audio"``), wanted and present in the input."""

    description: str
    duration_s: float | None
    streams: tuple[str, ...]


@dataclass(frozen=True)
class Corrupt:
    detail: str


@dataclass(frozen=True)
class Ended:
    pass


@dataclass(frozen=True)
class Failed:
    detail: str
    at_open: bool


@dataclass(frozen=True)
class DecodeSpec:
    """What to open and how (built by :class:`AvSource` from its settings). ``live``: a
    network stream or a device, which can be opened and read only once at a time; a file
    is opened once per stream it decodes, and its video is decoded with threads."""

    url: str
    format: str | None
    options: dict[str, str]
    video: bool
    audio: bool
    timeout_s: tuple[float, float] | None
    live: bool


class PtsSanitiser:
    """Makes one kind of media time strictly increasing for a source, across reconnects.

    A missing pts becomes the last one plus ``step``; a small step back (jitter, a
    duplicate) becomes last + 1 ns; a large jump back (a restarted stream) shifts all later
    values so they continue from where the source was.
    """

    REBASE_NS = 1_000_000_000

    def __init__(self) -> None:
        self.last: int | None = None
        self.offset = 0
        self.fixed = 0

    def __call__(self, pts_ns: int | None, step_ns: int) -> int:
        last = self.last
        if pts_ns is None:
            value = step_ns if last is None else last + step_ns
            self.fixed += 1
        else:
            value = pts_ns + self.offset
            if last is not None and value <= last:
                self.fixed += 1
                if last - value > self.REBASE_NS:
                    self.offset += last + step_ns - value
                    value = last + step_ns
                else:
                    value = last + 1
        self.last = value
        return value


def _rgb_converter(frame: av.VideoFrame) -> Callable[[], npt.NDArray[np.uint8]]:
    def to_rgb() -> npt.NDArray[np.uint8]:
        return np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)

    return to_rgb


def _pts_ns(pts: int | None, time_base: Fraction | None) -> int | None:
    if pts is None or time_base is None:
        return None
    return pts * time_base.numerator * 1_000_000_000 // time_base.denominator


Decoded: TypeAlias = tuple[int, av.VideoFrame | npt.NDArray[np.float32] | Corrupt]
"""(media time in ns, a decoded video frame, 16 kHz mono samples or a skipped packet).
The media times of one stream increase strictly; a :class:`Corrupt` carries the last one."""


class Decoder:
    """One connection's decode loop; :meth:`run` is the thread body."""

    def __init__(
        self,
        source_id: str,
        spec: DecodeSpec,
        bridge: ThreadBridge,
        seq: itertools.count[int],
        video_pts: PtsSanitiser,
        audio_pts: PtsSanitiser,
        wall_ns: Callable[[], int],
    ) -> None:
        self.source_id = source_id
        self.spec = spec
        self.bridge = bridge
        self.seq = seq
        self.video_pts = video_pts
        self.audio_pts = audio_pts
        self.wall_ns = wall_ns
        self.resampler: av.AudioResampler | None = None
        self.audio_base_ns: int | None = None
        self.audio_samples = 0
        self.video_step_ns = 40_000_000

    def run(self) -> None:
        with contextlib.ExitStack() as opened:  # every container and demuxer, closed on every path
            started = time.monotonic()
            try:
                container = opened.enter_context(self._open())
            except Exception as exc:
                self.bridge.put(Failed(self._open_failure(exc, time.monotonic() - started), at_open=True), last=True)
                return
            try:
                self._demux(container, opened)
            except Exception as exc:
                self.bridge.put(Failed(_one_line(exc), at_open=False), last=True)
            else:
                self.bridge.put(Ended(), last=True)

    def _open_failure(self, exc: Exception, waited_s: float) -> str:
        """Why opening failed, in one line. A live server that accepts the connection but
        never answers makes FFmpeg give up at the timeout with "invalid data": it is a
        timeout, and said so."""
        limit_s = self.spec.timeout_s[0] if self.spec.timeout_s else None
        if self.spec.live and limit_s and isinstance(exc, av.error.InvalidDataError) and waited_s >= 0.9 * limit_s:
            return f"no answer within {limit_s:g} s (timeout)"
        return _one_line(exc)

    def _open(self) -> Any:
        return av.open(
            self.spec.url,
            mode="r",
            format=self.spec.format,
            options=self.spec.options,
            timeout=self.spec.timeout_s,
        )

    def _demux(self, container: Any, opened: contextlib.ExitStack) -> None:
        """Decode the wanted streams of ``container`` into the bridge; what it opens (a
        second container, the demuxers) goes on ``opened``."""
        video = container.streams.video[0] if self.spec.video and container.streams.video else None
        audio = container.streams.audio[0] if self.spec.audio and container.streams.audio else None
        if video is None and audio is None:
            wanted = " or ".join(k for k, on in (("video", self.spec.video), ("audio", self.spec.audio)) if on)
            raise ValueError(f"no {wanted or 'wanted'} stream in input")
        if video is not None and audio is not None and not self.spec.live:
            audio_container = opened.enter_context(self._open())
            audio = audio_container.streams.audio[0]
            # Each demuxer skips the other's packets instead of reading them for nothing.
            for own, stream in ((container, video), (audio_container, audio)):
                for other in own.streams:
                    if other.index != stream.index:
                        other.discard = Discard.all
            decoded = [
                opened.enter_context(contextlib.closing(self._decoded(container, [video]))),
                opened.enter_context(contextlib.closing(self._decoded(audio_container, [audio]))),
            ]
            items: Iterator[Decoded] = heapq.merge(*decoded, key=itemgetter(0))
        else:
            streams = [s for s in (video, audio) if s is not None]
            items = opened.enter_context(contextlib.closing(self._decoded(container, streams)))
        if video is not None:
            if not self.spec.live:
                video.thread_type = "AUTO"
            rate = video.average_rate or video.guessed_rate
            if rate:
                self.video_step_ns = int(1_000_000_000 / rate)
        if audio is not None:
            self.resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_SAMPLE_RATE)
        duration = container.duration / 1_000_000 if container.duration else None
        kinds = tuple(kind for kind, stream in (("video", video), ("audio", audio)) if stream is not None)
        self.bridge.put(Opened(_describe(video, audio), duration, kinds))
        for pts_ns, media in items:
            if not self.bridge.put(media if isinstance(media, Corrupt) else self._packet(pts_ns, media)):
                return

    def _decoded(self, container: Any, streams: list[Any]) -> Generator[Decoded, None, None]:
        """Demux and decode ``streams`` of ``container`` in its file order, ending with the
        resampler's last samples when they include the audio. Stops when the bridge closes."""
        last_ns = -(1 << 63)
        for packet in container.demux(streams):
            if self.bridge.closed:
                return
            try:
                frames = packet.decode()
            except (av.error.InvalidDataError, av.error.PatchWelcomeError, ValueError) as exc:
                yield last_ns, Corrupt(_one_line(exc))
                continue
            for frame in frames:
                if isinstance(frame, av.VideoFrame):
                    last_ns = self.video_pts(_pts_ns(frame.pts, frame.time_base), self.video_step_ns)
                    yield last_ns, frame
                else:
                    for last_ns, samples in self._audio(frame):
                        yield last_ns, samples
        if any(stream.type == "audio" for stream in streams):
            yield from self._audio(None)

    def _packet(self, pts_ns: int, media: av.VideoFrame | npt.NDArray[np.float32]) -> VideoFrame | AudioChunk:
        """The packet leaving the decoder now (numbered and wall-timed in leaving order)."""
        if isinstance(media, av.VideoFrame):
            return VideoFrame(
                self.source_id, next(self.seq), pts_ns, self.wall_ns(), y_plane(media), _rgb_converter(media)
            )
        return AudioChunk(self.source_id, next(self.seq), pts_ns, self.wall_ns(), media)

    def _audio(self, frame: av.AudioFrame | None) -> list[tuple[int, npt.NDArray[np.float32]]]:
        """(media time in ns, 16 kHz mono samples) resampled from ``frame``; ``None`` flushes
        the resampler. Nothing when no audio is decoded."""
        if self.resampler is None:
            return []
        if frame is not None and self.audio_base_ns is None:
            self.audio_base_ns = _pts_ns(frame.pts, frame.time_base) or 0
        try:
            out = self.resampler.resample(frame)
        except ValueError:
            # The input's format or layout changed mid-stream: start a new resampler.
            self.resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_SAMPLE_RATE)
            out = self.resampler.resample(frame)
        chunks = []
        for resampled in out:
            # A downmix of many loud channels can exceed full scale: keep the [-1, 1] contract.
            samples = np.clip(resampled.to_ndarray().reshape(-1), -1.0, 1.0).astype(np.float32, copy=False)
            if not len(samples):
                continue
            pts = (self.audio_base_ns or 0) + self.audio_samples * 1_000_000_000 // AUDIO_SAMPLE_RATE
            self.audio_samples += len(samples)
            step = len(samples) * 1_000_000_000 // AUDIO_SAMPLE_RATE
            chunks.append((self.audio_pts(pts, step), samples))
        return chunks


def _describe(video: Any, audio: Any) -> str:
    parts = []
    if video is not None:
        ctx = video.codec_context
        parts.append(f"video {ctx.name} {ctx.width}x{ctx.height}")
    if audio is not None:
        ctx = audio.codec_context
        parts.append(f"audio {ctx.name} {ctx.sample_rate} Hz")
    return ", ".join(parts)


def _one_line(exc: BaseException) -> str:
    """FFmpeg's own words ("Invalid data found when processing input") without the errno
    and the file name, which the caller names already."""
    strerror = getattr(exc, "strerror", None)
    text = " ".join((strerror if isinstance(strerror, str) and strerror else str(exc)).split())
    return text or type(exc).__name__

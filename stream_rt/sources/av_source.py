"""One PyAV source for files, network URLs and capture devices, video and audio.

Decoding runs in a thread per connection (see :mod:`stream_rt.sources.av_decode`); this
node pumps its packets into the graph, paces replayed media through the graph's clock,
and, for live inputs, keeps the stream alive: a **watchdog** reconnects with exponential
backoff and jitter when no frame has arrived for ``stall_timeout_s``, when the decode
thread dies, or when the stream ends. Status changes go out as
:class:`~stream_rt.graph.packets.SourceStatus` on the ``status`` port.

A file that cannot be opened raises :class:`SourceError` (one line naming the file and
the cause); a packet that cannot be decoded is counted (``corrupt_packets``) and skipped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
from pathlib import Path

import av

from stream_rt.config.sources import InputConfig
from stream_rt.graph.backoff import Backoff, Retry
from stream_rt.graph.node import Context
from stream_rt.graph.packets import AudioChunk, Packet, SourceStatus, VideoFrame
from stream_rt.sources.av_decode import (
    Corrupt,
    Decoder,
    DecodeSpec,
    Ended,
    Failed,
    Opened,
    PtsSanitiser,
    _one_line,
)
from stream_rt.sources.bridge import ThreadBridge
from stream_rt.sources.status import StatusSource

log = logging.getLogger("stream_rt.sources")

LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "udp", "tcp", "http", "https", "srt", "rtp")

# FFmpeg options that make network inputs robust: TCP for RTSP, regenerate missing
# timestamps, drop corrupt packets instead of passing garbage to the decoder.
LIVE_OPTIONS = {"fflags": "+genpts+discardcorrupt"}
RTSP_OPTIONS = {"rtsp_transport": "tcp"}


class SourceError(RuntimeError):
    """A source cannot deliver: the file is missing or unreadable, or not a media file."""


class AvSource(StatusSource):
    """Decode ``url`` (a file path, a network URL or a device) into video and audio packets.

    ``config`` says how to read it (:class:`~stream_rt.config.InputConfig`: input format,
    FFmpeg options, timeouts, reconnect backoff; a ``[[sources]]`` entry is one). Its
    ``live``: ``None`` guesses from the URL (network schemes and devices are live, paths
    are files). A file ends the source when it ends; a live input is reconnected forever.
    ``timeout_s`` bounds each network open and read (live inputs only); ``seed`` seeds the
    reconnect jitter.
    """

    outputs = {"video": (VideoFrame,), "audio": (AudioChunk,), "status": (SourceStatus,)}

    def __init__(
        self,
        name: str,
        url: str,
        *,
        video: bool = True,
        audio: bool = True,
        config: InputConfig | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(name, has_video=video, has_audio=audio)
        config = config or InputConfig()
        self.config = config
        self.url = url
        self.live = _guess_live(url, config.format) if config.live is None else config.live
        defaults = {}
        if self.live:
            defaults.update(LIVE_OPTIONS)
            if url.startswith(("rtsp://", "rtsps://")):
                defaults.update(RTSP_OPTIONS)
        timeout_s = config.timeout_s
        self.spec = DecodeSpec(
            url=url,
            format=config.format,
            options={**defaults, **config.options},
            video=video,
            audio=audio,
            timeout_s=(timeout_s, timeout_s) if self.live else None,
            live=self.live,
        )
        self.stall_timeout_s = config.stall_timeout_s
        self.backoff = Backoff(**config.reconnect.model_dump())
        self._rng = random.Random(seed)
        self._seq = itertools.count()
        self._video_pts = PtsSanitiser()
        self._audio_pts = PtsSanitiser()
        self._delivered = False

    def check(self) -> None:
        """Open a file source once, as decoding will, and close it: raises
        :class:`SourceError` (one line) when it cannot be read, before anything runs. A
        live input is not tried (a camera may come later)."""
        if self.live:
            return
        self._check_exists()
        try:
            with av.open(self.url, mode="r", format=self.spec.format, options=self.spec.options):
                pass
        except Exception as exc:
            raise SourceError(f"cannot open '{self.url}': {_one_line(exc)}") from None

    def _check_exists(self) -> None:
        if "://" not in self.url and not self.spec.format and not Path(self.url).exists():
            raise SourceError(f"cannot open '{self.url}': no such file")

    async def run(self, ctx: Context) -> None:
        self._check_exists()
        retry = Retry(self.backoff, ctx.clock, self._rng)
        while True:
            detail = await self._connection(ctx)
            if detail is None:
                self.end(ctx)  # a file ended
                return
            await self.set_state(ctx, "offline", detail)
            if self._delivered:  # the connection worked for a while: back to the shortest wait
                retry.succeeded()
            delay = retry.failed()
            log.warning(
                "source '%s' offline (%s); reconnecting in %.1f s",
                self.name,
                detail,
                delay,
                extra={"source": self.name},
            )
            await ctx.clock.sleep(delay)
            ctx.count("reconnects")

    async def _connection(self, ctx: Context) -> str | None:
        """Run one connection. None when a file ended; otherwise why a live input was lost."""
        loop = asyncio.get_running_loop()
        # Files are read faster than real time: wake the loop every other frame, not every
        # frame. Keep few frames in flight: each one pins a decoder buffer, and a decoder
        # that cannot reuse hot buffers slows down (measured in benchmarks/RESULTS.md).
        bridge = ThreadBridge(loop, capacity=8, wake_batch=1 if self.live else 2)
        decoder = Decoder(self.name, self.spec, bridge, self._seq, self._video_pts, self._audio_pts, ctx.clock.wall_ns)
        thread = threading.Thread(
            target=decoder.run,
            name=f"stream_rt-decode-{self.name}",
            daemon=True,
        )
        thread.start()
        try:
            return await self._pump(ctx, bridge, thread)
        finally:
            bridge.close()
            ctx.counters["pts_fixed"] = self._video_pts.fixed + self._audio_pts.fixed

    async def _pump(self, ctx: Context, bridge: ThreadBridge, thread: threading.Thread) -> str | None:
        clock = ctx.clock
        paced = clock.paces and not self.live
        last_frame_ns = clock.now_ns()
        self._delivered = False
        while True:
            items = bridge.drain()
            if not items:
                if not self.live:
                    items = [await bridge.get()]
                else:
                    waited_s = (clock.now_ns() - last_frame_ns) / 1e9
                    try:
                        items = [await asyncio.wait_for(bridge.get(), max(0.0, self.stall_timeout_s - waited_s))]
                    except TimeoutError:
                        if not thread.is_alive():
                            return "decode thread died"
                        return f"no frame for {self.stall_timeout_s:g} s"
            for item in items:
                if isinstance(item, Packet):
                    if self.state != "online":
                        await self.set_state(ctx, "online", self.description)
                    if paced:
                        await clock.pace(self.name, item.pts_ns)
                    self.position_s = item.pts_ns / 1e9
                    last_frame_ns = clock.now_ns()
                    if isinstance(item, VideoFrame):
                        self._delivered = True
                        self.frame_rate.tick(last_frame_ns)
                        await ctx.emit("video", item)
                        ctx.counters["frames"] += 1
                    else:
                        await ctx.emit("audio", item)
                        ctx.counters["audio_chunks"] += 1
                else:
                    done, result = self._on_event(ctx, item)
                    if done:
                        return result

    def _on_event(self, ctx: Context, item: object) -> tuple[bool, str | None]:
        """Handle a non-packet item from the decode thread; (True, why) ends the connection."""
        if isinstance(item, Corrupt):
            ctx.count("corrupt_packets")
            log.debug("source '%s': skipped a corrupt packet: %s", self.name, item.detail, extra={"source": self.name})
        elif isinstance(item, Opened):
            self.description = item.description
            self.duration_s = item.duration_s
            self.streams = item.streams
            log.info("source '%s' opened %s (%s)", self.name, self.url, item.description, extra={"source": self.name})
        elif isinstance(item, Ended):
            if self.live:
                return True, "stream ended"
            self._check_complete()
            return True, None
        elif isinstance(item, Failed):
            if self.live:
                return True, item.detail
            if item.at_open:
                raise SourceError(f"cannot open '{self.url}': {item.detail}")
            ctx.count("read_errors")
            log.warning(
                "source '%s' stopped reading '%s' early: %s",
                self.name,
                self.url,
                item.detail,
                extra={"source": self.name},
            )
            return True, None
        return False, None

    def _check_complete(self) -> None:
        """A file that ends well before the duration its header declares was cut short
        (a copy or a recording interrupted, its index written first): say so."""
        declared = self.duration_s
        if declared and self.position_s < declared - max(1.0, 0.05 * declared):
            self.cut_short = f"ended at {self.position_s:.1f} s of its {declared:.1f} s"
            log.warning("source '%s': '%s' %s: the file is cut short (truncated)", self.name, self.url,
                        self.cut_short, extra={"source": self.name})  # fmt: skip


def _guess_live(url: str, format: str | None) -> bool:
    if format is not None:
        return True  # a capture device such as v4l2 or alsa
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower() in LIVE_SCHEMES

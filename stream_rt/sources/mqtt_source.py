"""Frames published over MQTT by another program (a robot's own loop, an existing camera
pipeline) as a graph source.

Each message on ``topic`` is one frame: a JPEG (``format="jpeg"``, decoded with PyAV's
MJPEG decoder off the event loop) or raw pixels (``format="gray"`` or ``"rgb24"``, with
``width`` and ``height``). JPEG luma is full range (0..255), where video decoders usually give limited-range luma
(16..235). MQTT carries no media time, so ``pts_ns`` is the arrival time
on the graph's clock, made strictly increasing. At most ``queued`` messages wait for the
graph: when a publisher is faster, the oldest waiting one is replaced by the new one (a
camera wants the newest picture) and counted (``frames_replaced``). A payload that does not
decode is counted (``corrupt_frames``), skipped and logged at warning: the first at once,
then at most one line a minute saying how many were skipped since, with the last reason.
The connection is retried with backoff; ``online`` / ``offline`` status goes out on the
``status`` port like any source's: ``offline`` too when no frame came for
``stall_timeout_s`` (the publisher stopped), ``online`` again with the next frame.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Literal

import aiomqtt
import numpy as np

from stream_rt.config.sources import InputConfig
from stream_rt.graph.backoff import Backoff, Retry
from stream_rt.graph.node import Context
from stream_rt.graph.packets import SourceStatus, VideoFrame
from stream_rt.media.images import decode_image, rgb_luma, y_plane
from stream_rt.sources.av_decode import PtsSanitiser
from stream_rt.sources.status import StatusSource

log = logging.getLogger("stream_rt.sources")

FrameFormat = Literal["jpeg", "gray", "rgb24"]

CORRUPT_LOG_INTERVAL_NS = 60_000_000_000
"""Skipped payloads are logged at most once this often (after the first)."""


def decode_frame(
    payload: bytes, fmt: FrameFormat, width: int | None, height: int | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(Y plane, RGB or None) of one message; raises ValueError if it is not a frame."""
    if fmt == "jpeg":
        frame = decode_image(payload, "mjpeg")
        return np.array(y_plane(frame)), frame.to_ndarray(format="rgb24")
    if width is None or height is None:
        raise ValueError("raw frames need width and height")
    channels = 1 if fmt == "gray" else 3
    if len(payload) != width * height * channels:
        raise ValueError(f"{fmt} frame of {width}x{height} needs {width * height * channels} bytes, got {len(payload)}")
    pixels = np.frombuffer(payload, np.uint8).reshape(height, width, channels)
    if fmt == "gray":
        return pixels[:, :, 0], None
    return rgb_luma(pixels), pixels


def latest_queue(on_replaced: Callable[[], None]) -> type[asyncio.Queue[aiomqtt.Message]]:
    """A queue class for ``aiomqtt.Client(queue_type=...)`` that, when full, drops its
    oldest message to take the new one, calling ``on_replaced`` for each dropped."""

    class LatestQueue(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            if self.full():
                self.get_nowait()
                on_replaced()
            super().put_nowait(item)

    return LatestQueue


class MqttSource(StatusSource):
    """A graph source of frames published over MQTT on ``topic`` at the broker ``host``:``port``
    (one JPEG, or raw ``gray`` / ``rgb24`` pixels of ``width`` x ``height``, per message: ``config``'s
    ``frames``, ``width`` and ``height``, :class:`~stream_rt.config.InputConfig`). Outputs: ``video``
    (:class:`VideoFrame`, media time = arrival time on the graph's clock) and ``status``.
    Reconnects to the broker with ``config.reconnect``; a payload that does not decode is counted
    and skipped."""

    outputs = {"video": (VideoFrame,), "status": (SourceStatus,)}

    def __init__(
        self,
        name: str,
        topic: str,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        username: str | None = None,
        password: str | None = None,
        config: InputConfig | None = None,
        queued: int = 2,
    ) -> None:
        if queued < 1:
            raise ValueError(f"source '{name}': queued must be >= 1, got {queued}")
        super().__init__(name, has_video=True, has_audio=False)
        config = config or InputConfig()
        self.config = config
        self.queued = queued
        self.stall_timeout_s = config.stall_timeout_s
        self.topic, self.host, self.port = topic, host, port
        self.username, self.password = username, password
        self.format, self.width, self.height = config.frames, config.width, config.height
        self.backoff = Backoff(**config.reconnect.model_dump())
        self.description = f"{self.format} frames on mqtt://{host}:{port}/{topic}"
        self._pts = PtsSanitiser()
        self._seq = 0
        self._rng = random.Random()
        self._corrupt_logged_ns: int | None = None  # when skipped payloads were last logged
        self._corrupt_unlogged = 0  # skipped since
        self._corrupt_reason = ""  # the last one's

    async def run(self, ctx: Context) -> None:
        retry = Retry(self.backoff, ctx.clock, self._rng)
        start_ns = ctx.clock.now_ns()
        queue = latest_queue(lambda: ctx.count("frames_replaced"))
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                          timeout=10, queue_type=queue,
                                          max_queued_incoming_messages=self.queued) as client:  # fmt: skip
                    await client.subscribe(self.topic, qos=0)
                    retry.succeeded()
                    await self.set_state(ctx, "online", f"subscribed to {self.topic}")
                    loop = asyncio.get_running_loop()
                    last_frame = loop.time()
                    while True:
                        waited = loop.time() - last_frame
                        try:
                            message = await asyncio.wait_for(anext(client.messages), self.stall_timeout_s - waited)
                        except TimeoutError:  # subscribed, but the camera sends nothing (that decodes)
                            await self.set_state(ctx, "offline", f"no frame for {self.stall_timeout_s:g} s")
                            last_frame = loop.time()
                            continue
                        payload = message.payload if isinstance(message.payload, bytes) else b""
                        if await self._frame(ctx, payload, ctx.clock.now_ns() - start_ns):
                            last_frame = loop.time()
            except aiomqtt.MqttError as exc:
                await self.set_state(ctx, "offline", str(exc))
                ctx.count("reconnects")
                await retry.pause()

    async def _frame(self, ctx: Context, payload: bytes, arrival_ns: int) -> bool:
        """Emit the frame ``payload`` holds; False when it is not one (counted, logged)."""
        try:
            y, rgb = await asyncio.to_thread(decode_frame, payload, self.format, self.width, self.height)
        except ValueError as exc:
            ctx.count("corrupt_frames")
            self._corrupt_unlogged += 1
            self._corrupt_reason = str(exc)
            self._log_corrupt(ctx)
            return False
        self._log_corrupt(ctx)
        await self.set_state(ctx, "online", f"frames on {self.topic}")
        pts = self._pts(arrival_ns, 1)
        frame = VideoFrame(
            self.name, self._seq, pts, ctx.clock.wall_ns(), y, (lambda: rgb) if rgb is not None else None
        )
        self._seq += 1
        self.frame_rate.tick(ctx.clock.now_ns())
        await ctx.emit("video", frame)
        ctx.count("frames")
        return True

    def _log_corrupt(self, ctx: Context) -> None:
        """Log the skipped payloads not logged yet: the first at once, later ones together
        once ``CORRUPT_LOG_INTERVAL_NS`` has passed since the last line."""
        n, now, last = self._corrupt_unlogged, ctx.clock.now_ns(), self._corrupt_logged_ns
        if not n or (last is not None and now - last < CORRUPT_LOG_INTERVAL_NS):
            return
        if last is None:
            log.warning("source '%s': skipped a message that is not a frame: %s (more are counted as corrupt_frames "
                        "and logged at most once a minute)", self.name, self._corrupt_reason,
                        extra={"source": self.name})  # fmt: skip
        else:
            log.warning("source '%s': skipped %d message%s that %s not a frame in the last %.0f s; the last: %s",
                        self.name, n, "s" if n > 1 else "", "were" if n > 1 else "was", (now - last) / 1e9,
                        self._corrupt_reason, extra={"source": self.name})  # fmt: skip
        self._corrupt_logged_ns, self._corrupt_unlogged = now, 0

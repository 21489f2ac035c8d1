"""Frames published over MQTT by another program (a robot's own loop, an existing camera
pipeline) as a graph source.

Each message on ``topic`` is one frame: a JPEG (``format="jpeg"``, decoded with PyAV's
MJPEG decoder off the event loop) or raw pixels (``format="gray"`` or ``"rgb24"``, with
``width`` and ``height``). JPEG luma is full range (0..255), where video decoders usually give limited-range luma
(16..235). MQTT carries no media time, so ``pts_ns`` is the arrival time
on the graph's clock, made strictly increasing. A payload that does not decode is counted
(``corrupt_frames``) and skipped. The connection is retried with backoff; ``online`` /
``offline`` status goes out on the ``status`` port like any source's.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Literal

import aiomqtt
import numpy as np

from stream_rt.graph.backoff import Backoff
from stream_rt.graph.node import Context
from stream_rt.graph.packets import SourceStatus, VideoFrame
from stream_rt.sources.av_decode import PtsSanitiser, decode_image, rgb_luma, y_plane
from stream_rt.sources.status import StatusSource

log = logging.getLogger("stream_rt.sources")

FrameFormat = Literal["jpeg", "gray", "rgb24"]


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


class MqttSource(StatusSource):
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
        format: FrameFormat = "jpeg",
        width: int | None = None,
        height: int | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__(name, has_video=True, has_audio=False)
        self.topic, self.host, self.port = topic, host, port
        self.username, self.password = username, password
        self.format, self.width, self.height = format, width, height
        self.backoff = backoff or Backoff(0.5, 10.0, 0.2)
        self.description = f"{format} frames on mqtt://{host}:{port}/{topic}"
        self._pts = PtsSanitiser()
        self._seq = 0
        self._rng = random.Random()

    async def run(self, ctx: Context) -> None:
        failures = 0
        start_ns = ctx.clock.now_ns()
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                          timeout=10) as client:  # fmt: skip
                    await client.subscribe(self.topic, qos=0)
                    failures = 0
                    await self.set_state(ctx, "online", f"subscribed to {self.topic}")
                    async for message in client.messages:
                        payload = message.payload if isinstance(message.payload, bytes) else b""
                        await self._frame(ctx, payload, ctx.clock.now_ns() - start_ns)
            except aiomqtt.MqttError as exc:
                await self.set_state(ctx, "offline", str(exc))
                ctx.count("reconnects")
                await ctx.clock.sleep(self.backoff.delay(failures, self._rng))
                failures += 1

    async def _frame(self, ctx: Context, payload: bytes, arrival_ns: int) -> None:
        try:
            y, rgb = await asyncio.to_thread(decode_frame, payload, self.format, self.width, self.height)
        except ValueError as exc:
            ctx.count("corrupt_frames")
            log.debug(
                "source '%s': skipped a message that is not a frame: %s", self.name, exc, extra={"source": self.name}
            )
            return
        pts = self._pts(arrival_ns, 1)
        frame = VideoFrame(
            self.name, self._seq, pts, ctx.clock.wall_ns(), y, (lambda: rgb) if rgb is not None else None
        )
        self._seq += 1
        self.frame_rate.tick(ctx.clock.now_ns())
        await ctx.emit("video", frame)
        ctx.count("frames")

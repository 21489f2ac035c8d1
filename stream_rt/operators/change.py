"""Visual change detection: which patches of a frame differ from a running background.

For each frame, :func:`~stream_rt.operators.kernels.patch_mad` compares the Y plane with
a background plane; a patch is *changed* when its mean absolute difference exceeds both
``threshold`` and ``noise_k`` times that patch's own noise level (a running average of
its difference while unchanged, so busy texture, foliage or a codec's keyframe pulsing
raise the bar only where they occur). Groups of at least ``min_region_patches``
connected changed patches become regions. The background follows the scene slowly (1/16 of the difference every
``background_every`` frames), so something that stops moving is absorbed within seconds
and stops firing. When at least ``recalibrate_fraction`` of the patches change at once
(lights switched, camera gain jump, a cut) the background is reset to the frame instead
of reporting a change.

The kernels cost about 0.1 ms per 720p frame, so they run inline on the event loop;
handing each frame to a thread would cost more than the work.
"""

from __future__ import annotations

import numpy as np

from stream_rt.graph.node import Context, Node
from stream_rt.graph.packets import Box, ChangeMap, EndOfStream, Packet, StreamEnded, VideoFrame
from stream_rt.operators.kernels import blend_background, classify_patches, connected_boxes, patch_mad


class ChangeDetector(Node):
    inputs = {"video": (VideoFrame,)}
    outputs = {"changes": (ChangeMap,)}

    def __init__(
        self,
        name: str,
        *,
        patch: int = 16,
        threshold: float = 12.0,
        min_region_patches: int = 2,
        recalibrate_fraction: float = 0.6,
        background_every: int = 2,
        noise_k: float = 3.0,
    ) -> None:
        super().__init__(name)
        if patch < 4 or threshold <= 0 or not 0 < recalibrate_fraction <= 1 or background_every < 1:
            raise ValueError("change detector: need patch >= 4, threshold > 0, 0 < recalibrate_fraction <= 1")
        self.patch = patch
        self.threshold = threshold
        self.min_region_patches = min_region_patches
        self.recalibrate_fraction = recalibrate_fraction
        self.background_every = background_every
        self.noise_k = noise_k
        self._backgrounds: dict[str, tuple[np.ndarray, int]] = {}
        self._noise: dict[str, np.ndarray] = {}

    async def process(self, packet: Packet, ctx: Context) -> None:
        assert isinstance(packet, VideoFrame)
        await ctx.emit("changes", self.detect(packet, ctx))

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, EndOfStream):  # one source's video ended: forget it, tell those after
            self._backgrounds.pop(packet.source_id, None)
            self._noise.pop(packet.source_id, None)
            await ctx.emit("changes", StreamEnded(packet.source_id, -1, -1, packet.wall_ns, packet.reason))

    def detect(self, frame: VideoFrame, ctx: Context | None = None) -> ChangeMap:
        """The change map of ``frame`` against its source's background (updated here)."""
        y = frame.y
        state = self._backgrounds.get(frame.source_id)
        if state is None or state[0].shape != y.shape:
            # First frame of a source (or a new resolution): it becomes the background.
            self._backgrounds[frame.source_id] = (np.ascontiguousarray(y).copy(), 0)
            return self._empty(frame, recalibrated=True)
        background, frames_seen = state
        mad = patch_mad(y, background, self.patch)
        noise = self._noise.get(frame.source_id)
        if noise is None or noise.shape != mad.shape:
            # Start no higher than the plain threshold asks for: no blind spots at start-up.
            noise = self._noise[frame.source_id] = np.minimum(mad, self.threshold / max(self.noise_k, 1e-6))
        changed, changed_patches = classify_patches(mad, noise, self.threshold, self.noise_k)
        fraction = changed_patches / changed.size
        if fraction >= self.recalibrate_fraction:
            background[:] = y
            self._backgrounds[frame.source_id] = (background, 0)
            if ctx is not None:
                ctx.count("recalibrations")
            return self._empty(frame, recalibrated=True, mad=mad)
        frames_seen += 1
        if frames_seen % self.background_every == 0:
            blend_background(background, y)
        self._backgrounds[frame.source_id] = (background, frames_seen)
        regions = self._regions(changed) if changed_patches else ()
        return ChangeMap(
            frame.source_id, frame.seq, frame.pts_ns, frame.wall_ns, self.patch,
            mad, changed, fraction, regions, False, frame,
        )  # fmt: skip

    def _regions(self, changed: np.ndarray) -> tuple[Box, ...]:
        p = self.patch
        boxes = [b for b in connected_boxes(changed).tolist() if b[4] >= self.min_region_patches]
        boxes.sort(key=lambda b: -b[4])
        return tuple((b[0] * p, b[1] * p, b[2] * p, b[3] * p) for b in boxes)

    def _empty(self, frame: VideoFrame, recalibrated: bool, mad: np.ndarray | None = None) -> ChangeMap:
        shape = (frame.height // self.patch, frame.width // self.patch)
        if mad is None:
            mad = np.zeros(shape, np.float32)
        return ChangeMap(
            frame.source_id, frame.seq, frame.pts_ns, frame.wall_ns, self.patch,
            mad, np.zeros(shape, np.bool_), 0.0, (), recalibrated, frame,
        )  # fmt: skip

"""The object gate: a pretrained detector on the frames where change fired, and a tracker.

Change maps pass through. For a source with detection on, a change map with regions
runs the detector on its frame when the source's last run is at least ``1 / detect_fps``
of media time ago (``detector_runs``; frames without change never run it); the tracker
(:mod:`stream_rt.operators.tracking`) follows what it finds. Every change map then
carries the source's tracked objects, each with the zones it stands in, and the zones
they add to the map's.

With ``objects`` (COCO labels, e.g. ``["person", "car"]``) the gate keeps only the
changed regions that overlap a moving (not stationary) tracked object of those labels —
in a required zone, when the source requires zones — so only those objects make visual
activity: leaves, shadows and rain with no such object are not activity, and a parked
car or a person standing still does not open an episode again and again. Without
``objects`` the objects only describe the events.

The detector runs on a thread of its own, never on the event loop. In a lossless graph
(replays, evaluations: ``wait``) each change map waits for its detection, so results do
not depend on speed; live, maps go on with the tracks as they are while a detection
runs, and the tracks catch up when it finishes (a map that is due while one runs is
counted as ``detector_busy``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from stream_rt.config import DetectConfig
from stream_rt.graph.node import Context, Node, describe_error
from stream_rt.graph.packets import Box, ChangeMap, DetectedObject, EndOfStream, Packet, StreamEnded, VideoFrame
from stream_rt.operators.detectors import Detection, Detector
from stream_rt.operators.tracking import Tracker
from stream_rt.operators.zones import SceneLayout

log = logging.getLogger("stream_rt.objects")

MARGIN = 0.25
"""Regions count for an object when they overlap its predicted box grown by this share
of its size on every side (it moves between detections)."""


@dataclass
class _Source:
    detector: Detector
    settings: DetectConfig
    objects: tuple[str, ...]  # the labels whose moving objects make activity (none: every change does)
    layout: SceneLayout
    tracker: Tracker
    last_run_ns: int | None = None
    running: asyncio.Task[None] | None = field(default=None, repr=False)


class ObjectGate(Node):
    """Change maps in and out on ``changes``: for each source :meth:`configure`-d with a
    detector, a map with changed regions runs the detector (at most ``detect_fps`` per
    source, in a thread of its own; ``wait``: the map waits for it) and carries the tracked
    objects; with ``objects`` only regions overlapping such moving objects stay activity.
    Sources without a detector pass unchanged."""

    inputs = {"changes": (ChangeMap,)}
    outputs = {"changes": (ChangeMap,)}

    def __init__(self, name: str, *, wait: bool = True) -> None:
        super().__init__(name)
        self.wait = wait
        self._sources: dict[str, _Source] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="stream_rt-detector")

    def configure(
        self,
        source_id: str,
        detector: Detector,
        settings: DetectConfig,
        objects: Sequence[str] = (),
        layout: SceneLayout | None = None,
    ) -> None:
        """Run ``detector`` (loaded from ``settings``; sources may share one) for
        ``source_id``, which wants ``objects`` (its ``objects`` key). Raises ``ValueError``
        when it wants objects the detector cannot name."""
        unknown = [label for label in objects if label not in detector.labels]
        if unknown:
            hints = [difflib.get_close_matches(label.replace(" ", "_"), detector.labels, n=1) for label in unknown]
            named = ", ".join(
                f"'{u}'" + (f" (did you mean '{h[0]}'?)" if h else "") for u, h in zip(unknown, hints, strict=True)
            )
            raise ValueError(f"source '{source_id}': objects {named}: not a label of the detector {detector.name}")
        tracker = Tracker(stationary_s=settings.stationary_s, lost_s=settings.lost_s)
        self._sources[source_id] = _Source(detector, settings, tuple(objects), layout or SceneLayout(), tracker)

    async def stop(self, ctx: Context) -> None:
        for source in self._sources.values():
            if source.running is not None:
                await asyncio.gather(source.running, return_exceptions=True)

    async def process(self, packet: Packet, ctx: Context) -> None:
        assert isinstance(packet, ChangeMap)
        source = self._sources.get(packet.source_id)
        if source is None:
            await ctx.emit("changes", packet)
            return
        p = source.settings
        due = bool(packet.regions) and (
            source.last_run_ns is None or packet.pts_ns - source.last_run_ns >= 1e9 / p.detect_fps
        )
        if due and source.running is not None and not source.running.done():
            ctx.count("detector_busy", source=packet.source_id)
        elif due:
            source.last_run_ns = packet.pts_ns
            run = asyncio.ensure_future(self._detect(source, packet.frame, packet.pts_ns, ctx))
            source.running = run
            if self.wait:
                await run
        await ctx.emit("changes", self._gated(source, packet))

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, StreamEnded | EndOfStream) and packet.source_id in self._sources:
            source = self._sources[packet.source_id]
            if source.running is not None:
                await asyncio.gather(source.running, return_exceptions=True)
            source.tracker.tracks.clear()
            source.last_run_ns = None
        if isinstance(packet, StreamEnded):
            await ctx.emit("changes", packet)

    async def _detect(self, source: _Source, frame: VideoFrame, pts_ns: int, ctx: Context) -> None:
        detector = source.detector

        def run() -> list[Detection]:
            return detector.detect(frame.rgb())

        try:
            detections = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        except Exception as exc:  # a bad frame or model error: counted and logged, the gate goes on
            ctx.count("detector_errors", source=frame.source_id)
            log.warning("%s: detector failed on %s: %s", self.name, frame.source_id, describe_error(exc))
            return
        ctx.count("detector_runs", source=frame.source_id)
        source.tracker.update(detections, pts_ns)

    def _gated(self, source: _Source, changes: ChangeMap) -> ChangeMap:
        """``changes`` with the source's objects, and only the regions of wanted moving
        objects when the source names the objects it wants."""
        layout, tracker = source.layout, source.tracker
        width, height, at = changes.frame.width, changes.frame.height, changes.pts_ns
        objects = []
        for track in tracker.tracks:
            still = tracker.is_stationary(track, at)
            box = track.box if still else track.predicted(at)
            where = tuple(layout.box_zones(box, width, height)) if layout.zones else ()
            objects.append(DetectedObject(track.label, track.score, box, track.track_id, where, still))
        regions = changes.regions
        if source.objects:
            wanted = [
                o.box for o in objects
                if o.label in source.objects and not o.stationary
                and (not layout.require_zones or set(o.zones) & set(layout.require_zones))
            ]  # fmt: skip
            regions = tuple(r for r in regions if any(_overlaps(r, _grown(box)) for box in wanted))
        zones = list(changes.zones)
        if regions != changes.regions:  # the zones of the regions kept
            grids = layout.grids(width, height, changes.patch)[1]
            named = (z for r in regions for z in layout.region_zones(changes.changed, r, changes.patch, grids))
            zones = list(dict.fromkeys(named))
        for o in objects:  # where the moving objects that made this map's activity stand
            if not o.stationary and any(_overlaps(r, _grown(o.box)) for r in regions):
                zones += [z for z in o.zones if z not in zones]
        return dataclasses.replace(changes, regions=regions, objects=tuple(objects), zones=tuple(zones))


def _grown(box: Box) -> Box:
    x0, y0, x1, y1 = box
    dx, dy = MARGIN * (x1 - x0), MARGIN * (y1 - y0)
    return (round(x0 - dx), round(y0 - dy), round(x1 + dx), round(y1 + dy))


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

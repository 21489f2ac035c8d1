"""Visual change detection: which patches of a frame differ from a running background.

For each frame, :func:`~stream_rt.operators.kernels.patch_mad` compares the Y plane with
a background plane; a patch is *changed* when its mean absolute difference exceeds both
``threshold`` and ``noise_k`` times that patch's own noise level (a running average of
its difference while unchanged, so sensor noise and a codec's keyframe pulsing raise the
bar only where they occur). Groups of at least ``min_region_patches`` connected changed
patches become regions. The background follows the scene slowly (1/16 of the difference
every ``background_every`` frames), so something that stops moving is absorbed within
seconds and stops firing.

What is not activity:

- **Light** (``light``): before comparing, the background is mapped through the tone
  curve that takes it to the frame (:mod:`stream_rt.operators.light`) once that curve
  moves luma by more than ``light_tolerance``: brightness and contrast changes of the
  whole frame, sudden or spread over seconds, are followed (``light_adjustments``) while
  whatever moved meanwhile still differs. A patch the one curve leaves past ``threshold``
  that the light did not move against the light change (its mean luma since the change
  began: the light's way, or back by under ``AGAINST``) — colours clipped per channel, a
  strongly coloured or saturated patch, whose luma the light moves less than the rest —
  is re-toned on its own where the frame's patch is a brighter or darker copy of the
  background's (both textured, correlated, a plausible gain). A shadow falling as the
  scene brightens moves against the light and stays change; a faint one (under
  ``AGAINST`` darker than the brightening) is taken for light. A light change that takes a quarter of the
  patches past ``threshold`` in one frame, most of them explained by the curve, is a jump
  (lights switched off, a switch to infrared, which also changes how colours look in grey):
  what the curve leaves is taken into the background from the frame except where
  something moved lately (``light_recalibrations``), so people walking, or arriving and
  stopping, as it happens are still found. The background is reset to a frame
  of which at least ``recalibrate_fraction`` of the patches still change (a cut, the
  camera moved: ``recalibrations``).
- **Busy patches** (``busy_share``): a patch that would change in at least that share of
  the frames of the last ``busy_window_s`` of media time (leaves, water, rain, a screen)
  is busy and changes only above ``busy_k`` times its usual difference, so a person
  crossing it still counts (gauge ``busy_patches/<source>``). The share starts as a plain
  average over the first frames, and a source's first ``CALIBRATION_FRAMES`` frames
  report no change, so leaves in view at start-up are learned, not reported.
- **Masks**: patches under a source's mask polygons never change.

Each change map names the source's zones its regions touched; with ``require_zones`` the
regions outside them are dropped (activity elsewhere is not activity).

Every setting can differ per source (:meth:`ChangeDetector.configure`). The kernels cost
about 0.1 ms per 720p frame, so they run inline on the event loop; handing each frame to
a thread would cost more than the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stream_rt.config import ChangeConfig
from stream_rt.graph.node import Context, Node
from stream_rt.graph.packets import Box, ChangeMap, EndOfStream, Packet, StreamEnded, VideoFrame
from stream_rt.operators.kernels import (
    apply_lut,
    blend_background,
    classify_patches,
    connected_boxes,
    patch_mad,
    patch_mad_means,
    retone_patches,
)
from stream_rt.operators.light import tone_curve
from stream_rt.operators.zones import SceneLayout

RECENTLY_CHANGED = 0.05
"""Patches that changed in at least this share of recent frames are left out of the light
model's fit (an object that stopped there, leaves): what moved is not light."""
FIT_SHARE = 0.3
"""...unless fewer than this share of the patches are left to fit."""
LIGHT_JUMP = 0.25
"""A light change that takes this share of the patches past the threshold in one frame..."""
JUMP_LEFT = 0.25
"""...and leaves no more than this share of them past it once the tone curve is applied is a
jump (lights switched off, a switch to infrared, which also changes how colours look in
grey): what the curve left is taken from the frame, except where something moved lately."""
JUMP_GAP_S = 2.0
"""At most one jump in this much media time (a light flickering is followed by the curve)."""
AGAINST = 0.1
"""A patch the tone curve leaves is re-toned on its own only if its luma moved against the
light by at most this share since the light change began."""
LIGHT_QUIET_S = 1.0
"""A light change ends when the tone curve has not been needed for this long."""
CALIBRATION_FRAMES = 8
"""A source's first frames only teach the noise and busy levels; they report no change."""


@dataclass
class _State:
    background: npt.NDArray[np.uint8]
    frames_seen: int = 0  # since the background was last reset
    frames_total: int = 0
    noise: npt.NDArray[np.float32] | None = None
    activity: npt.NDArray[np.float32] | None = None
    level: npt.NDArray[np.float32] | None = None
    last_pts: int | None = None
    busy: int = 0
    light_jump_ns: int | None = None  # media time of the last light jump
    light_ns: int | None = None  # media time the tone curve was last applied
    light_start: npt.NDArray[np.float32] | None = None  # patch means of the background as that light change began


class ChangeDetector(Node):
    """Video frames (``video``, the Y plane only) in, one :class:`ChangeMap` per frame out on
    ``changes``: which patches differ from the source's running background, its changed
    regions and the zones they touch. Light changes and busy patches recalibrate instead of
    firing (see the module docstring). ``settings`` are the defaults of every source;
    :meth:`configure` gives a source its own and its masks and zones. A source's end is passed
    on as :class:`StreamEnded` after its last map."""

    inputs = {"video": (VideoFrame,)}
    outputs = {"changes": (ChangeMap,)}

    def __init__(self, name: str, settings: ChangeConfig | None = None) -> None:
        """``settings``: every source's, unless :meth:`configure` gives it its own
        (``enabled`` is the pipeline's to read: a detector detects)."""
        super().__init__(name)
        self.defaults = settings or ChangeConfig()
        self._settings: dict[str, ChangeConfig] = {}
        self._layouts: dict[str, SceneLayout] = {}
        self._states: dict[str, _State] = {}

    def configure(
        self, source_id: str, layout: SceneLayout | None = None, settings: ChangeConfig | None = None
    ) -> None:
        """Give ``source_id`` its masks and zones, and settings of its own (its effective
        ``[change]`` section; default: the detector's)."""
        if settings is not None:
            self._settings[source_id] = settings
        if layout is not None:
            self._layouts[source_id] = layout

    def settings(self, source_id: str) -> ChangeConfig:
        return self._settings.get(source_id, self.defaults)

    async def process(self, packet: Packet, ctx: Context) -> None:
        assert isinstance(packet, VideoFrame)
        await ctx.emit("changes", self.detect(packet, ctx))

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, EndOfStream):  # one source's video ended: forget it, tell those after
            self._states.pop(packet.source_id, None)
            await ctx.emit("changes", StreamEnded(packet.source_id, -1, -1, packet.wall_ns, packet.reason))

    def gauges(self, now_ns: int) -> dict[str, float]:
        return {f"busy_patches/{source}": state.busy for source, state in self._states.items()}

    def detect(self, frame: VideoFrame, ctx: Context | None = None) -> ChangeMap:
        """The change map of ``frame`` against its source's background (updated here)."""
        source = frame.source_id
        p = self.settings(source)
        y = frame.y
        if frame.width < p.patch or frame.height < p.patch:  # not one whole patch: nothing to compare
            self._count(ctx, "frames_too_small", source)
            return self._empty(frame, p, recalibrated=False)
        state = self._states.get(source)
        if state is None or state.background.shape != y.shape:
            # First frame of a source (or a new resolution): it becomes the background.
            self._states[source] = _State(np.ascontiguousarray(y).copy(), last_pts=frame.pts_ns)
            return self._empty(frame, p, recalibrated=True)
        layout = self._layouts.get(source)
        masked, zones = layout.grids(frame.width, frame.height, p.patch) if layout else (None, {})
        background = state.background
        if p.light:  # one pass gives the difference and what the tone curve is fitted to
            mad, frame_means, background_means = patch_mad_means(y, background, p.patch)
            valid = np.ones(mad.shape, np.bool_) if masked is None else ~masked
            fit = valid
            if state.activity is not None and state.activity.shape == mad.shape:  # what moved lately is not light
                still = valid & (state.activity < RECENTLY_CHANGED)
                if still.sum() >= FIT_SHARE * valid.sum():
                    fit = still  # (rain or a crowd over most of the frame: fit to all of it)
            table = tone_curve(background_means, frame_means, p.light_tolerance, fit, judged_on=valid)
            if table is not None:
                before = mad
                apply_lut(background, table)
                mad = patch_mad(y, background, p.patch)
                left = (mad > p.threshold) & valid & self._with_the_light(state, frame, background_means, frame_means)
                if left.any() and retone_patches(y, background, left, p.patch):
                    mad = patch_mad(y, background, p.patch)
                if self._jumped(state, frame, before, mad, valid, p):
                    mad = patch_mad(y, background, p.patch)
                    self._count(ctx, "light_recalibrations", source)
                else:
                    self._count(ctx, "light_adjustments", source)
        else:
            mad = patch_mad(y, background, p.patch)
        if state.noise is None or state.noise.shape != mad.shape:
            # Start no higher than the plain threshold asks for: no blind spots at start-up.
            state.noise = np.minimum(mad, p.threshold / max(p.noise_k, 1e-6))
            state.activity = np.zeros_like(mad)
            state.level = mad.copy()
        assert state.activity is not None and state.level is not None
        dt_s = max(0.0, (frame.pts_ns - (state.last_pts or frame.pts_ns)) / 1e9)
        state.last_pts = frame.pts_ns
        state.frames_seen += 1
        state.frames_total += 1
        busy_rate = min(1.0, max(dt_s / p.busy_window_s, 1.0 / state.frames_total))
        changed, changed_patches, state.busy = classify_patches(
            mad, state.noise, p.threshold, p.noise_k, activity=state.activity, level=state.level, ignored=masked,
            busy_share=p.busy_share, busy_k=p.busy_k, busy_rate=busy_rate,
        )  # fmt: skip
        usable = changed.size - (int(masked.sum()) if masked is not None else 0)
        fraction = changed_patches / max(1, usable)
        if fraction >= p.recalibrate_fraction:
            background[:] = y
            state.frames_seen = 0
            self._count(ctx, "recalibrations", source)
            return self._empty(frame, p, recalibrated=True, mad=mad)
        if state.frames_seen % p.background_every == 0:
            blend_background(background, y)
        if state.frames_total < CALIBRATION_FRAMES:
            changed[:] = False
            changed_patches = 0
        regions = self._regions(changed, p) if changed_patches else ()
        touched: list[str] = []
        if regions and zones:
            assert layout is not None
            kept = []
            for region in regions:
                named = layout.region_zones(changed, region, p.patch, zones)
                if not layout.require_zones or set(named) & set(layout.require_zones):
                    kept.append(region)
                    touched += [z for z in named if z not in touched]
            regions = tuple(kept)
        return ChangeMap(
            source, frame.seq, frame.pts_ns, frame.wall_ns, p.patch,
            mad, changed, fraction, regions, False, frame, tuple(touched),
        )  # fmt: skip

    @staticmethod
    def _with_the_light(
        state: _State, frame: VideoFrame, background_means: npt.NDArray[np.float32],
        frame_means: npt.NDArray[np.float32],
    ) -> npt.NDArray[np.bool_]:  # fmt: skip
        """The patches whose mean luma moved the light's way since the light change began,
        or against it by at most ``AGAINST`` of their luma (clipping and a codec's
        smoothing lower the brightest a little as the scene brightens): those the curve
        leaves past the threshold may be re-toned on their own. A shadow falling as the
        scene brightens, or a light coming on as it darkens, moves against the light."""
        if (
            state.light_ns is None
            or frame.pts_ns - state.light_ns > LIGHT_QUIET_S * 1e9
            or (state.light_start is None or state.light_start.shape != frame_means.shape)
        ):
            state.light_start = background_means.copy()  # a new light change starts here
        state.light_ns = frame.pts_ns
        start = state.light_start
        brighter = float(np.median(frame_means - start)) >= 0
        if brighter:
            return frame_means >= start * (1 - AGAINST)
        return frame_means <= start * (1 + AGAINST)

    @staticmethod
    def _jumped(
        state: _State, frame: VideoFrame, before: npt.NDArray[np.float32], after: npt.NDArray[np.float32],
        valid: npt.NDArray[np.bool_], p: ChangeConfig,
    ) -> bool:  # fmt: skip
        """Whether the light change from ``before`` (the difference to the background) to
        ``after`` (once re-toned) is a jump, counted over the ``valid`` (unmasked) patches;
        if so, the background takes the frame where the curve left a difference and nothing
        moved lately."""
        was = np.count_nonzero((before > p.threshold) & valid)
        left = (after > p.threshold) & valid
        recovered = state.light_jump_ns is None or frame.pts_ns - state.light_jump_ns >= JUMP_GAP_S * 1e9
        if not recovered or was < LIGHT_JUMP * valid.sum() or np.count_nonzero(left) > JUMP_LEFT * was:
            return False
        # Where nothing moved lately, what the curve left is how colours look now (the
        # frame); where something did, it may be that thing.
        moving = np.zeros_like(left)
        if state.activity is not None and state.activity.shape == left.shape:
            moving = left & _near(state.activity >= RECENTLY_CHANGED)
        _take_frame(state.background, frame.y, moving, p.patch)
        state.light_jump_ns = frame.pts_ns
        return True

    @staticmethod
    def _count(ctx: Context | None, name: str, source: str) -> None:
        if ctx is not None:
            ctx.count(name, source=source)

    def _regions(self, changed: npt.NDArray[np.bool_], p: ChangeConfig) -> tuple[Box, ...]:
        size = p.patch
        boxes = [b for b in connected_boxes(changed).tolist() if b[4] >= p.min_region_patches]
        boxes.sort(key=lambda b: -b[4])
        return tuple((b[0] * size, b[1] * size, b[2] * size, b[3] * size) for b in boxes)

    def _empty(
        self, frame: VideoFrame, p: ChangeConfig, recalibrated: bool, mad: npt.NDArray[np.float32] | None = None
    ) -> ChangeMap:
        shape = (frame.height // p.patch, frame.width // p.patch)
        if mad is None:
            mad = np.zeros(shape, np.float32)
        return ChangeMap(
            frame.source_id, frame.seq, frame.pts_ns, frame.wall_ns, p.patch,
            mad, np.zeros(shape, np.bool_), 0.0, (), recalibrated, frame,
        )  # fmt: skip


def _near(patches: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """``patches`` and their eight neighbours (where someone walking goes next)."""
    out = patches.copy()
    out[1:] |= patches[:-1]
    out[:-1] |= patches[1:]
    grown = out.copy()
    grown[:, 1:] |= out[:, :-1]
    grown[:, :-1] |= out[:, 1:]
    return grown


def _take_frame(background: npt.NDArray[np.uint8], y: npt.NDArray[np.uint8], keep: npt.NDArray[np.bool_],
                patch: int) -> None:  # fmt: skip
    """The background becomes the frame, except in the ``keep`` patches."""
    rows, cols = keep.shape
    pixels = np.repeat(np.repeat(keep, patch, axis=0), patch, axis=1)
    kept = background[: rows * patch, : cols * patch][pixels]
    background[:] = y
    background[: rows * patch, : cols * patch][pixels] = kept

"""What a keyframe of the replay report shows drawn on it: the source's masks shaded, its
zones outlined (yellow), the event's changed regions (red) and its objects (green; grey
when stationary)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from stream_rt.graph.packets import Event
from stream_rt.media.images import Polygon, inside, polygon_in_pixels


class Layout(Protocol):
    """What a thumbnail shows of a source's layout (a :class:`~stream_rt.operators.zones.SceneLayout`)."""

    @property
    def masks(self) -> Sequence[Polygon]: ...

    @property
    def zones(self) -> Mapping[str, Polygon]: ...


MASK_SHADE, ZONE, REGION, OBJECT, STILL = (40, 40, 40), (255, 210, 0), (230, 40, 40), (40, 200, 70), (160, 160, 160)


def overlay(rgb: npt.NDArray[np.uint8], event: Event, layout: Layout | None) -> npt.NDArray[np.uint8]:
    """A copy of ``rgb`` with the masks shaded, the zones outlined, the event's changed
    regions and its objects boxed."""
    out = rgb.copy()
    height, width = out.shape[:2]
    if layout is not None:
        ys, xs = np.mgrid[0:height:2, 0:width:2].astype(np.float64)
        for polygon in layout.masks:
            hit = inside(polygon_in_pixels(polygon, width, height), xs + 0.5, ys + 0.5)
            shade = np.repeat(np.repeat(hit, 2, axis=0), 2, axis=1)[:height, :width]
            out[shade] = (out[shade] // 3 + np.array(MASK_SHADE, np.uint8) // 2).astype(np.uint8)
        for polygon in layout.zones.values():
            corners = polygon_in_pixels(polygon, width, height)
            for a, b in zip(corners, corners[1:] + corners[:1], strict=True):
                _line(out, a, b, ZONE)
    for x0, y0, x1, y1 in event.regions:
        _rectangle(out, (x0, y0, x1, y1), REGION)
    for o in event.objects:
        _rectangle(out, o.box, STILL if o.stationary else OBJECT)
    return out


def _line(rgb: npt.NDArray[np.uint8], a: tuple[float, float], b: tuple[float, float], colour: tuple[int, ...]) -> None:
    steps = int(max(abs(b[0] - a[0]), abs(b[1] - a[1]))) + 1
    xs = np.clip(np.linspace(a[0], b[0], steps).round().astype(int), 0, rgb.shape[1] - 2)
    ys = np.clip(np.linspace(a[1], b[1], steps).round().astype(int), 0, rgb.shape[0] - 2)
    for dy in (0, 1):  # two pixels wide, so the line survives the thumbnail's scaling
        for dx in (0, 1):
            rgb[ys + dy, xs + dx] = colour


def _rectangle(rgb: npt.NDArray[np.uint8], box: tuple[int, int, int, int], colour: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = box
    for a, b in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        _line(rgb, a, b, colour)

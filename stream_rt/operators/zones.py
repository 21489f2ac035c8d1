"""A camera's layout: masks that change detection ignores and named zones that events report.

Polygons are lists of ``(x, y)`` corners, in pixels or, when every coordinate lies within
0..1, in shares of the frame's width and height (so one layout fits every resolution of
a camera). Change detection works on patches, so a polygon is rasterised once per frame
size onto the patch grid: a patch belongs to it when the patch's centre lies inside.

An object is in a zone when the middle of its box's bottom edge is (where it stands);
a changed region touches a zone when one of its changed patches lies in the zone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from stream_rt.graph.packets import Box
from stream_rt.media.images import Polygon, inside, polygon_in_pixels

Grid = npt.NDArray[np.bool_]


@dataclass
class SceneLayout:
    """One source's masks and zones, and the zones its episodes require."""

    masks: Sequence[Polygon] = ()
    zones: Mapping[str, Polygon] = field(default_factory=dict)
    require_zones: Sequence[str] = ()
    _grids: dict[tuple[int, int, int], tuple[Grid | None, dict[str, Grid]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        unknown = [name for name in self.require_zones if name not in self.zones]
        if unknown:
            raise ValueError(f"required zones {unknown} are not among the zones {list(self.zones)}")

    @property
    def empty(self) -> bool:
        return not self.masks and not self.zones

    def grids(self, width: int, height: int, patch: int) -> tuple[Grid | None, dict[str, Grid]]:
        """The masked patches (``None`` without masks) and each zone's patches, for a
        ``width x height`` frame cut into ``patch``-pixel patches."""
        key = (width, height, patch)
        cached = self._grids.get(key)
        if cached is None:
            rows, cols = height // patch, width // patch
            ys, xs = np.mgrid[0:rows, 0:cols].astype(np.float64)
            xs, ys = (xs + 0.5) * patch, (ys + 0.5) * patch
            masked = None
            for polygon in self.masks:
                grid = inside(polygon_in_pixels(polygon, width, height), xs, ys)
                masked = grid if masked is None else masked | grid
            zones = {name: inside(polygon_in_pixels(p, width, height), xs, ys) for name, p in self.zones.items()}
            cached = self._grids[key] = (masked, zones)
        return cached

    def region_zones(self, changed: Grid, region: Box, patch: int, zones: Mapping[str, Grid]) -> list[str]:
        """The zones that the changed patches inside ``region`` (pixels) touch."""
        x0, y0, x1, y1 = (v // patch for v in region)
        window = changed[y0:y1, x0:x1]
        return [name for name, grid in zones.items() if (window & grid[y0:y1, x0:x1]).any()]

    def box_zones(self, box: Box, width: int, height: int) -> list[str]:
        """The zones an object with this box stands in (the middle of its bottom edge)."""
        foot_x, foot_y = np.array([(box[0] + box[2]) / 2]), np.array([box[3] - 1.0])
        return [
            name for name, p in self.zones.items() if inside(polygon_in_pixels(p, width, height), foot_x, foot_y)[0]
        ]

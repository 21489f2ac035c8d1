"""Polygons of a source's frame, as masks and zones take them."""

from __future__ import annotations

import itertools
from typing import Annotated

from pydantic import AfterValidator, Field

Point = tuple[float, float]


def _has_area(corners: list[Point]) -> list[Point]:
    (ax, ay), rest = corners[0], corners[1:]  # a fan of triangles: a crossed outline has area too
    doubled = sum(abs((x0 - ax) * (y1 - ay) - (x1 - ax) * (y0 - ay)) for (x0, y0), (x1, y1) in itertools.pairwise(rest))
    if doubled < 1e-9:
        raise ValueError(f"the polygon {corners} has no area")
    return corners


Polygon = Annotated[list[Point], Field(min_length=3), AfterValidator(_has_area)]
"""A polygon's corners ``[[x, y], ...]``: pixels, or all within 0..1 for shares of the frame."""

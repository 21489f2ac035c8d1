"""Light changes of the whole frame: the tone curve that maps the background onto a frame.

Auto-exposure, a cloud, lights switched on or off, or a camera's infrared day/night
switch change the brightness and contrast of most of the frame at once, suddenly or over
a few seconds; compared pixel by pixel with the background, that is change everywhere.
It is one smooth, monotonic curve from old luma to new luma, though, which moving things
do not follow: :func:`tone_curve` fits that curve to the patches' mean luma (piecewise
linear through the median shift of each band of 16 luma levels, so clipping at white
bends it as it should and people and cars in view, a minority of every band, do not) and
returns it as a 256-entry table once it moves luma by more than a tolerance. Change
detection maps its background through the table and compares again: what the light did
is gone, what moved is still there.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from stream_rt.operators.kernels import band_medians

BIN = 16
"""Luma levels per bin of the curve."""
MIN_PATCHES = 6
"""Patches a bin needs before it shapes the curve."""
CLEARLY = 3
"""A curve is applied only if it brings this many times more patches closer to the frame
than it takes away from it (each by more than the tolerance)."""


def tone_curve(
    background_means: npt.NDArray[np.float32],
    frame_means: npt.NDArray[np.float32],
    tolerance: float,
    valid: npt.NDArray[np.bool_] | None = None,
    judged_on: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.uint8] | None:
    """The table mapping background luma to frame luma, or ``None`` while the fitted
    curve stays within ``tolerance`` levels of unchanged over the luma the scene has, or
    when it would not bring most patches closer to the frame (something big in view, not
    light). ``valid`` selects the patches to fit (masks, and patches that changed lately,
    left out); ``judged_on`` those it must help (default: all)."""
    usable = np.ones(background_means.shape, np.bool_) if valid is None else valid
    knots = band_medians(background_means, frame_means, usable, BIN, MIN_PATCHES)
    if not len(knots) or np.abs(knots[:, 1]).max() <= tolerance:  # between the knots it moves no more
        return None
    kx, ky = knots[:, 0], knots[:, 0] + knots[:, 1]
    levels = np.arange(256, dtype=np.float64)
    curve = np.interp(levels, kx, ky)
    if len(kx) >= 2:  # beyond the scene's luma (bright or dark pixels of its patches): the end segments go on
        low, high = levels < kx[0], levels > kx[-1]
        curve[low] = ky[0] + (levels[low] - kx[0]) * (ky[1] - ky[0]) / (kx[1] - kx[0])
        curve[high] = ky[-1] + (levels[high] - kx[-1]) * (ky[-1] - ky[-2]) / (kx[-1] - kx[-2])
    else:
        curve = levels + (ky[0] - kx[0])  # one band: the same shift everywhere
    # Light moves every patch its way; a curve bent by something big in view takes the rest
    # of the scene away from the frame.
    table: npt.NDArray[np.uint8] = np.maximum.accumulate(np.clip(np.rint(curve), 0, 255)).astype(np.uint8)
    judged = np.ones(background_means.shape, np.bool_) if judged_on is None else judged_on
    x, y = background_means[judged], frame_means[judged]
    gain = np.abs(y - x) - np.abs(y - np.interp(x, levels, table.astype(np.float64)))
    if np.count_nonzero(gain > tolerance) < CLEARLY * np.count_nonzero(gain < -tolerance):
        return None
    return table

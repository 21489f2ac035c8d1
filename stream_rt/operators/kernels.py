"""Per-patch image kernels (Numba, ``nogil``); their plain-numpy definitions are in
:mod:`stream_rt.operators.kernels_reference`.

All kernels take luma planes as 2-D uint8 arrays (views with any row stride are fine) and
work on a grid of ``patch x patch`` pixel patches; a partial patch at the right or bottom
edge is ignored. Results are per patch, shape ``(height // patch, width // patch)``.

Each per-frame kernel makes one pass over its inputs with a *row accumulator*: the innermost loop
runs along a row and adds into one slot per pixel column, which the compiler vectorises;
the per-patch sums are folded out of the accumulator once per patch row. The naive loop
(indexing the patch sum per pixel) is about 20x slower. :func:`retone_patches`, which runs
only on the few patches a light change leaves, loops per patch.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numba import njit

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


@njit(nogil=True, cache=True)
def _patch_mad(cur: U8, bg: U8, patch: int, out: F32) -> None:
    rows, cols = out.shape
    width = cols * patch
    # uint16 holds a column of up to 257 rows of |difference| (<= 255 each) exactly.
    acc = np.zeros(width, np.uint16)
    area = np.float32(patch * patch)
    for py in range(rows):
        acc[:] = 0
        for y in range(py * patch, (py + 1) * patch):
            c = cur[y]
            b = bg[y]
            for x in range(width):
                acc[x] += max(c[x], b[x]) - min(c[x], b[x])
        for px in range(cols):
            total = np.int32(0)
            for x in range(px * patch, (px + 1) * patch):
                total += acc[x]
            out[py, px] = np.float32(total) / area


BLEND_SHIFT = 4
""":func:`blend_background` moves the background by 1/16 of the difference per call (a
constant, so the kernel vectorises; call it less often for a slower average)."""


@njit(nogil=True, cache=True, fastmath=True)
def _blend(bg: U8, cur: U8) -> None:
    for y in range(bg.shape[0]):
        b = bg[y]
        c = cur[y]
        for x in range(bg.shape[1]):
            d = np.int16(c[x]) - np.int16(b[x])
            b[x] = np.uint8(np.int16(b[x]) + ((d + 8) >> 4))


def patch_mad(cur: U8, bg: U8, patch: int = 16) -> F32:
    """Mean absolute difference of each patch between ``cur`` and ``bg`` (0..255)."""
    _check(cur, bg, patch)
    if patch > 257:
        raise ValueError("patch_mad supports patches of at most 257 pixels")
    out = np.empty((cur.shape[0] // patch, cur.shape[1] // patch), np.float32)
    _patch_mad(cur, bg, patch, out)
    return out


def blend_background(bg: U8, cur: U8) -> None:
    """Move ``bg`` towards ``cur`` in place by 1/16 of each pixel's difference, rounded:
    a running average that settles within 8 levels of a still scene."""
    _check(cur, bg, 1)
    _blend(bg, cur)


@njit(nogil=True, cache=True, fastmath=True)
def _patch_cosine(a: U8, b: U8, patch: int, out: F32) -> None:
    rows, cols = out.shape
    width = cols * patch
    # int32 holds a column sum of up to 33 rows of 255 * 255 exactly.
    ab = np.zeros(width, np.int32)
    aa = np.zeros(width, np.int32)
    bb = np.zeros(width, np.int32)
    for py in range(rows):
        ab[:] = 0
        aa[:] = 0
        bb[:] = 0
        for y in range(py * patch, (py + 1) * patch):
            ra = a[y]
            rb = b[y]
            for x in range(width):
                va = np.int32(ra[x])
                vb = np.int32(rb[x])
                ab[x] += va * vb
                aa[x] += va * va
                bb[x] += vb * vb
        for px in range(cols):
            sab = np.int64(0)
            saa = np.int64(0)
            sbb = np.int64(0)
            for x in range(px * patch, (px + 1) * patch):
                sab += ab[x]
                saa += aa[x]
                sbb += bb[x]
            if saa == 0 and sbb == 0:
                out[py, px] = 1.0  # two black patches are the same
            elif saa == 0 or sbb == 0:
                out[py, px] = 0.0
            else:
                out[py, px] = sab / np.sqrt(np.float64(saa) * np.float64(sbb))


def patch_cosine(a: U8, b: U8, patch: int = 14) -> F32:
    """Cosine similarity of the raw pixels of each patch of ``a`` and ``b`` (-1..1; 1 for
    two all-black patches). The static-patch test of temporal token reuse (VLA-Cache uses
    14x14 patches and calls a patch static at >= 0.996)."""
    _check(a, b, patch)
    if patch > 33:
        raise ValueError("patch_cosine supports patches of at most 33 pixels")
    out = np.empty((a.shape[0] // patch, a.shape[1] // patch), np.float32)
    _patch_cosine(a, b, patch, out)
    return out


def _check(a: U8, b: U8, patch: int) -> None:
    if a.dtype != np.uint8 or b.dtype != np.uint8 or a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"kernels need two 2-D uint8 planes of one shape, got {a.shape}/{a.dtype}, {b.shape}/{b.dtype}"
        )
    if patch < 1 or a.shape[0] < patch or a.shape[1] < patch:
        raise ValueError(f"patch {patch} does not fit a {a.shape[1]}x{a.shape[0]} plane")


@njit(nogil=True, cache=True)
def _label_boxes(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.int32]:
    rows, cols = mask.shape
    seen = np.zeros((rows, cols), np.bool_)
    stack = np.empty((rows * cols, 2), np.int32)
    boxes = np.empty((rows * cols, 5), np.int32)
    count = 0
    for r0 in range(rows):
        for c0 in range(cols):
            if not mask[r0, c0] or seen[r0, c0]:
                continue
            seen[r0, c0] = True
            top = 0
            stack[0, 0] = r0
            stack[0, 1] = c0
            top = 1
            rmin, rmax, cmin, cmax, size = r0, r0, c0, c0, 0
            while top > 0:
                top -= 1
                r = stack[top, 0]
                c = stack[top, 1]
                size += 1
                rmin = min(rmin, r)
                rmax = max(rmax, r)
                cmin = min(cmin, c)
                cmax = max(cmax, c)
                for dr in range(-1, 2):
                    for dc in range(-1, 2):
                        rr = r + dr
                        cc = c + dc
                        if 0 <= rr < rows and 0 <= cc < cols and mask[rr, cc] and not seen[rr, cc]:
                            seen[rr, cc] = True
                            stack[top, 0] = rr
                            stack[top, 1] = cc
                            top += 1
            boxes[count, 0] = cmin
            boxes[count, 1] = rmin
            boxes[count, 2] = cmax + 1
            boxes[count, 3] = rmax + 1
            boxes[count, 4] = size
            count += 1
    return boxes[:count]


def connected_boxes(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.int32]:
    """Bounding boxes of the 8-connected groups of True cells in a patch grid, as rows of
    ``(col0, row0, col1, row1, cells)`` (end exclusive), in scan order."""
    return _label_boxes(np.ascontiguousarray(mask, dtype=np.bool_))


@njit(nogil=True, cache=True)
def _classify(
    mad: F32,
    noise: F32,
    activity: F32,
    level: F32,
    ignored: npt.NDArray[np.bool_],
    threshold: float,
    noise_k: float,
    rate: float,
    busy_share: float,
    busy_k: float,
    busy_rate: float,
    changed: npt.NDArray[np.bool_],
) -> tuple[int, int]:
    count = 0
    busy = 0
    for r in range(mad.shape[0]):
        for c in range(mad.shape[1]):
            m = mad[r, c]
            if ignored[r, c]:
                changed[r, c] = False
                continue
            hit = m > threshold and m > noise_k * noise[r, c]
            is_busy = busy_share > 0 and activity[r, c] >= busy_share
            if is_busy:
                busy += 1
            changed[r, c] = hit and not (is_busy and m <= busy_k * level[r, c])
            if changed[r, c]:
                count += 1
            if not hit:
                noise[r, c] += rate * (m - noise[r, c])
            activity[r, c] += busy_rate * ((1.0 if hit else 0.0) - activity[r, c])
            level[r, c] += busy_rate * (m - level[r, c])
    return count, busy


def classify_patches(
    mad: F32,
    noise: F32,
    threshold: float,
    noise_k: float,
    rate: float = 0.05,
    *,
    activity: F32 | None = None,
    level: F32 | None = None,
    ignored: npt.NDArray[np.bool_] | None = None,
    busy_share: float = 0.0,
    busy_k: float = 2.0,
    busy_rate: float = 0.0,
) -> tuple[npt.NDArray[np.bool_], int, int]:
    """Mark the patches whose difference exceeds both ``threshold`` and ``noise_k`` times
    their noise level; move the noise level of every other patch ``rate`` of the way
    towards its difference (in place). ``ignored`` patches (masks) never change.

    Busy patches: ``activity`` (the share of recent frames a patch would have changed in)
    and ``level`` (its usual difference) move ``busy_rate`` of the way towards this
    frame's, in place; a patch whose activity is at least ``busy_share`` (0: never) is
    busy, and changes only above ``busy_k`` times its level. Returns the mask, how many
    patches changed, and how many are busy."""
    changed = np.empty(mad.shape, np.bool_)
    activity = np.zeros(mad.shape, np.float32) if activity is None else activity
    level = np.zeros(mad.shape, np.float32) if level is None else level
    ignored = np.zeros(mad.shape, np.bool_) if ignored is None else ignored
    count, busy = _classify(
        mad, noise, activity, level, ignored, float(threshold), float(noise_k), float(rate),
        float(busy_share), float(busy_k), float(busy_rate), changed,
    )  # fmt: skip
    return changed, int(count), int(busy)


@njit(nogil=True, cache=True)
def _patch_mad_means(cur: U8, bg: U8, patch: int, mad: F32, cur_means: F32, bg_means: F32) -> None:
    rows, cols = mad.shape
    width = cols * patch
    # uint16 holds a column of up to 257 rows of luma (or of |difference|) exactly.
    diff = np.zeros(width, np.uint16)
    a = np.zeros(width, np.uint16)
    b = np.zeros(width, np.uint16)
    area = np.float32(patch * patch)
    for py in range(rows):
        diff[:] = 0
        a[:] = 0
        b[:] = 0
        for y in range(py * patch, (py + 1) * patch):
            c = cur[y]
            g = bg[y]
            for x in range(width):
                diff[x] += max(c[x], g[x]) - min(c[x], g[x])
                a[x] += c[x]
                b[x] += g[x]
        for px in range(cols):
            d_total = np.int32(0)
            a_total = np.int32(0)
            b_total = np.int32(0)
            for x in range(px * patch, (px + 1) * patch):
                d_total += diff[x]
                a_total += a[x]
                b_total += b[x]
            mad[py, px] = np.float32(d_total) / area
            cur_means[py, px] = np.float32(a_total) / area
            bg_means[py, px] = np.float32(b_total) / area


def patch_mad_means(cur: U8, bg: U8, patch: int = 16) -> tuple[F32, F32, F32]:
    """In one pass: :func:`patch_mad` of ``cur`` against ``bg``, and each plane's mean
    luma per patch (what the light model fits its tone curve to)."""
    _check(cur, bg, patch)
    if patch > 257:
        raise ValueError("patch_mad_means supports patches of at most 257 pixels")
    shape = (cur.shape[0] // patch, cur.shape[1] // patch)
    mad, cur_means, bg_means = (np.empty(shape, np.float32) for _ in range(3))
    _patch_mad_means(cur, bg, patch, mad, cur_means, bg_means)
    return mad, cur_means, bg_means


@njit(nogil=True, cache=True)
def _apply_lut(plane: U8, lut: U8) -> None:
    for y in range(plane.shape[0]):
        row = plane[y]
        for x in range(plane.shape[1]):
            row[x] = lut[row[x]]


def apply_lut(plane: U8, lut: U8) -> None:
    """Map every pixel of ``plane`` through the 256-entry ``lut``, in place."""
    if lut.shape != (256,) or lut.dtype != np.uint8:
        raise ValueError("apply_lut needs a uint8 table of 256 entries")
    _check(plane, plane, 1)
    _apply_lut(plane, lut)


@njit(nogil=True, cache=True)
def _band_medians(
    x: F32, y: F32, valid: npt.NDArray[np.bool_], width: float, least: int, knots: npt.NDArray[np.float64]
) -> int:
    bands = knots.shape[0]
    band_of = np.empty(x.size, np.int64)
    sizes = np.zeros(bands + 1, np.int64)
    for i in range(x.size):
        band_of[i] = int(x[i] // width) if valid[i] else -1
        if band_of[i] >= 0:
            sizes[band_of[i] + 1] += 1
    starts = np.cumsum(sizes)  # band b's values are at starts[b]:starts[b + 1]
    filled = starts[:-1].copy()
    xs = np.empty(x.size, np.float32)
    ds = np.empty(x.size, np.float32)
    for i in range(x.size):
        b = band_of[i]
        if b >= 0:
            xs[filled[b]] = x[i]
            ds[filled[b]] = y[i] - x[i]
            filled[b] += 1
    count = 0
    for b in range(bands):
        if starts[b + 1] - starts[b] >= least:
            knots[count, 0] = np.median(xs[starts[b] : starts[b + 1]])
            knots[count, 1] = np.median(ds[starts[b] : starts[b + 1]])
            count += 1
    return count


def band_medians(x: F32, y: F32, valid: npt.NDArray[np.bool_], width: float, least: int) -> npt.NDArray[np.float64]:
    """For each band of ``width`` levels of ``x`` holding at least ``least`` valid values:
    the median ``x`` and the median ``y - x`` in it, as rows, in order of ``x``."""
    flat_x, flat_y = np.ascontiguousarray(x.ravel()), np.ascontiguousarray(y.ravel())
    flat_valid = np.ascontiguousarray(valid.ravel())
    knots = np.empty((int(256 // width) + 1, 2), np.float64)
    count = _band_medians(flat_x, flat_y, flat_valid, float(width), int(least), knots)
    return knots[:count]


@njit(nogil=True, cache=True)
def _retone_patches(
    cur: U8, bg: U8, todo: npt.NDArray[np.bool_], patch: int, min_corr: float, min_std: float,
    gains: tuple[float, float],
) -> int:  # fmt: skip
    area = float(patch * patch)
    done = 0
    for py in range(todo.shape[0]):
        for px in range(todo.shape[1]):
            if not todo[py, px]:
                continue
            sb = sf = sbb = sff = sbf = 0.0
            for y in range(py * patch, (py + 1) * patch):
                for x in range(px * patch, (px + 1) * patch):
                    b, f = float(bg[y, x]), float(cur[y, x])
                    sb += b
                    sf += f
                    sbb += b * b
                    sff += f * f
                    sbf += b * f
            mb, mf = sb / area, sf / area
            var_b, var_f = sbb / area - mb * mb, sff / area - mf * mf
            if var_b < min_std * min_std or var_f < min_std * min_std:
                continue  # a flat patch's gain says nothing: a uniform thing may have come
            cov = sbf / area - mb * mf
            gain = cov / var_b
            if cov / np.sqrt(var_b * var_f) < min_corr or not gains[0] <= gain <= gains[1]:
                continue
            for y in range(py * patch, (py + 1) * patch):
                for x in range(px * patch, (px + 1) * patch):
                    bg[y, x] = np.uint8(min(255.0, max(0.0, round(mf + gain * (float(bg[y, x]) - mb)))))
            done += 1
    return done


def retone_patches(
    cur: U8, bg: U8, todo: npt.NDArray[np.bool_], patch: int = 16, min_corr: float = 0.9, min_std: float = 8.0,
    gains: tuple[float, float] = (0.5, 2.0),
) -> int:  # fmt: skip
    """For each ``todo`` patch whose pixels in ``cur`` are a brighter or darker copy of
    those in ``bg`` (both textured by at least ``min_std`` levels, correlated by at least
    ``min_corr``, with a gain within ``gains``): ``bg``'s patch becomes that copy, in
    place. Returns how many patches were re-toned."""
    _check(cur, bg, patch)
    if todo.shape != (cur.shape[0] // patch, cur.shape[1] // patch):
        raise ValueError("retone_patches needs one flag per whole patch")
    return int(_retone_patches(cur, bg, np.ascontiguousarray(todo), patch, min_corr, min_std, gains))

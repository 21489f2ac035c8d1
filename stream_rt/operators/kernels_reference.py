"""The plain numpy definitions the kernels of :mod:`stream_rt.operators.kernels` must
match: slow and obviously right, for the tests that compare them and the benchmarks that
time them. Nothing in the pipeline calls them."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from stream_rt.operators.kernels import BLEND_SHIFT, F32, U8


def blend_background_reference(bg: U8, cur: U8) -> None:
    """The plain numpy definition :func:`blend_background` must match."""
    d = cur.astype(np.int16) - bg
    bg[:] = (bg + ((d + 8) >> BLEND_SHIFT)).astype(np.uint8)


def patch_mad_reference(cur: U8, bg: U8, patch: int = 16) -> F32:
    """The plain numpy definition :func:`patch_mad` must match."""
    rows, cols = cur.shape[0] // patch, cur.shape[1] // patch
    diff = np.abs(cur[: rows * patch, : cols * patch].astype(np.int32) - bg[: rows * patch, : cols * patch])
    sums = diff.reshape(rows, patch, cols, patch).sum(axis=(1, 3))
    mad: F32 = sums.astype(np.float32) / np.float32(patch * patch)
    return mad


def patch_cosine_reference(a: U8, b: U8, patch: int = 14) -> F32:
    """The plain numpy definition :func:`patch_cosine` must match."""
    rows, cols = a.shape[0] // patch, a.shape[1] // patch
    pa = a[: rows * patch, : cols * patch].astype(np.float64).reshape(rows, patch, cols, patch)
    pb = b[: rows * patch, : cols * patch].astype(np.float64).reshape(rows, patch, cols, patch)
    dot = (pa * pb).sum(axis=(1, 3))
    norms = np.sqrt((pa * pa).sum(axis=(1, 3)) * (pb * pb).sum(axis=(1, 3)))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / norms, 0.0)
    both_black = ((pa == 0).all(axis=(1, 3))) & ((pb == 0).all(axis=(1, 3)))
    return np.where(both_black, 1.0, cos).astype(np.float32)


def patch_means_reference(plane: U8, patch: int = 16) -> F32:
    """The plain numpy definition of the per-patch means :func:`patch_mad_means` gives."""
    rows, cols = plane.shape[0] // patch, plane.shape[1] // patch
    sums = plane[: rows * patch, : cols * patch].astype(np.float64).reshape(rows, patch, cols, patch).mean(axis=(1, 3))
    means: F32 = sums.astype(np.float32)
    return means


def retone_patches_reference(
    cur: U8, bg: U8, todo: npt.NDArray[np.bool_], patch: int = 16, min_corr: float = 0.9, min_std: float = 8.0,
    gains: tuple[float, float] = (0.5, 2.0),
) -> int:  # fmt: skip
    """The plain numpy definition of :func:`retone_patches`."""
    done = 0
    for py, px in zip(*np.nonzero(todo), strict=True):
        rows, cols = slice(py * patch, (py + 1) * patch), slice(px * patch, (px + 1) * patch)
        b, f = bg[rows, cols].astype(np.float64), cur[rows, cols].astype(np.float64)
        if b.std() < min_std or f.std() < min_std:
            continue
        cov = ((b - b.mean()) * (f - f.mean())).mean()
        gain = cov / b.var()
        if cov / (b.std() * f.std()) < min_corr or not gains[0] <= gain <= gains[1]:
            continue
        bg[rows, cols] = np.clip(np.rint(f.mean() + gain * (b - b.mean())), 0, 255).astype(np.uint8)
        done += 1
    return done

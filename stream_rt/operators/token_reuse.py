"""Which visual tokens may be reused between two calls on one source (model-agnostic).

A model's visual tokens each cover a rectangle of the picture: a :class:`TokenGrid` says
which part of the frame a block of tokens covers and how many rows and columns of tokens
it has (one grid per image for Qwen2-VL, one per tile plus the global view for SmolVLM).
:func:`token_patches` cuts each token's rectangle of luma, area-downscaled to 14x14
pixels, and :func:`patch_similarity` compares two such stacks with the per-patch cosine
similarity kernel of the change detector; :func:`static_tokens` calls a token static when
its patch is still close to the one its cached state was computed from (after VLA-Cache's
cosine >= 0.996, which VLA-Cache takes on the raw 14x14 patches of its encoder; here a
token's whole footprint is downscaled first, so detail finer than that can pass as
static, hence also a small mean difference).

The model-specific part — which layers, the K/V cache, the encoder — is in
:mod:`stream_rt.mllm.techniques.token_reuse`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stream_rt.media.images import scale_image
from stream_rt.operators.kernels import patch_cosine

PATCH = 14


@dataclass(frozen=True)
class TokenGrid:
    """``rows`` x ``cols`` tokens, row-major in the prompt, covering the part of image
    ``image`` between the fractions ``(x0, y0, x1, y1)`` of its width and height."""

    image: int
    region: tuple[float, float, float, float]
    rows: int
    cols: int

    @property
    def size(self) -> int:
        return self.rows * self.cols


def token_patches(lumas: list[npt.NDArray[np.uint8]], grids: list[TokenGrid]) -> npt.NDArray[np.uint8]:
    """Each visual token's rectangle of luma (``lumas``: the plane of each image), resized
    to 14x14, in prompt order: shape (tokens, 14, 14)."""
    out = []
    for grid in grids:
        y = lumas[grid.image]
        h, w = y.shape
        x0, y0, x1, y1 = grid.region
        top, left = int(y0 * h), int(x0 * w)
        crop = y[top : max(top + 1, int(y1 * h)), left : max(left + 1, int(x1 * w))]
        plane = scale_image(crop, grid.cols * PATCH, grid.rows * PATCH)
        out.append(plane.reshape(grid.rows, PATCH, grid.cols, PATCH).transpose(0, 2, 1, 3).reshape(-1, PATCH, PATCH))
    return np.concatenate(out) if out else np.zeros((0, PATCH, PATCH), np.uint8)


def patch_similarity(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Cosine similarity of each pair of 14x14 patches (two stacks of one shape)."""
    if a.shape != b.shape:
        raise ValueError(f"patch stacks differ: {a.shape} vs {b.shape}")
    # Patches stacked vertically form a (tokens * 14, 14) plane: one kernel call for all.
    return patch_cosine(a.reshape(-1, PATCH), b.reshape(-1, PATCH), PATCH).ravel()


def patch_difference(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Mean absolute luma difference of each pair of 14x14 patches. Cosine similarity of
    raw pixels is dominated by their brightness, so a textured patch that shifted by a few
    pixels can still score above 0.996; requiring a small difference as well catches it."""
    difference: npt.NDArray[np.float32] = np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(
        axis=(1, 2), dtype=np.float32
    )
    return difference


def static_tokens(
    reference: npt.NDArray[np.uint8],
    current: npt.NDArray[np.uint8],
    threshold: float = 0.996,
    max_difference: float = 6.0,
) -> npt.NDArray[np.bool_]:
    """Tokens whose patch is still what their cached state was computed from: cosine
    similarity at least ``threshold`` (VLA-Cache) and mean absolute difference at most
    ``max_difference`` luma levels."""
    return (patch_similarity(reference, current) >= threshold) & (
        patch_difference(reference, current) <= max_difference
    )

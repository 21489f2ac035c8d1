"""The last layers of an SSD detector, in numpy, as OpenCV's DNN module runs them for a
TensorFlow text graph (``tf_text_graph_ssd.py``): the anchors of each feature map
(OpenCV's ``PriorBox`` layer with explicit sizes) and the box decoding, per-class
non-maximum suppression and top-k of its ``DetectionOutput`` layer.

Their settings come from the text graph's ``PriorBox`` and ``DetectionOutput`` nodes
(:mod:`stream_rt.operators.ssd_convert` copies them into the converted model), so the
findings are the ones OpenCV 4's ``readNetFromTensorflow`` gave. Boxes are
``(xmin, ymin, xmax, ymax)`` in 0..1 of the network's input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class PriorBox:
    """One feature map's anchors: at each cell, one box of each ``(width, height)`` in
    input pixels, centred at ``(cell + offset) * step`` (step: input size / map size)."""

    widths: tuple[float, ...]
    heights: tuple[float, ...]
    variance: tuple[float, float, float, float]
    offset: float = 0.5
    clip: bool = False

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> PriorBox:
        """From a text graph node's attributes (numbers or lists already read)."""
        unknown = set(attrs) - {"width", "height", "variance", "offset", "clip", "flip"}
        if unknown or "width" not in attrs or len(attrs["width"]) != len(attrs.get("height", ())):
            raise ValueError(f"PriorBox: only explicit widths and heights are supported, got {sorted(attrs)}")
        variance = tuple(float(v) for v in attrs.get("variance", (0.1,)))
        if len(variance) == 1:
            variance = variance * 4
        return cls(
            widths=tuple(float(w) for w in attrs["width"]),
            heights=tuple(float(h) for h in attrs["height"]),
            variance=variance,  # type: ignore[arg-type]
            offset=float(attrs.get("offset", 0.5)),
            clip=bool(attrs.get("clip", False)),
        )

    def boxes(self, layer: tuple[int, int], image: tuple[int, int]) -> Floats:
        """``(rows x cols x sizes) x 4`` anchors of a ``layer`` (rows, cols) map over an
        ``image`` (height, width), in OpenCV's order: row, column, then size."""
        (rows, cols), (height, width) = layer, image
        step_y, step_x = np.float32(height / rows), np.float32(width / cols)
        cy = (np.arange(rows, dtype=np.float32) + np.float32(self.offset)) * step_y
        cx = (np.arange(cols, dtype=np.float32) + np.float32(self.offset)) * step_x
        half_w = np.asarray(self.widths, np.float32) * np.float32(0.5)
        half_h = np.asarray(self.heights, np.float32) * np.float32(0.5)
        shape = (rows, cols, len(self.widths))
        x = np.broadcast_to(cx[None, :, None], shape)
        y = np.broadcast_to(cy[:, None, None], shape)
        out = np.stack([(x - half_w) / np.float32(width), (y - half_h) / np.float32(height),
                        (x + half_w) / np.float32(width), (y + half_h) / np.float32(height)], axis=-1)  # fmt: skip
        out = out.reshape(-1, 4).astype(np.float32)
        return np.clip(out, 0, 1) if self.clip else out


def anchors(layers: Sequence[tuple[PriorBox, tuple[int, int]]], image: tuple[int, int]) -> tuple[Floats, Floats]:
    """The anchors of every ``(PriorBox, (rows, cols))`` feature map in turn, as OpenCV's
    concatenated ``PriorBox`` layers give them, and each anchor's variances: both ``N x 4``."""
    boxes = [prior.boxes(layer, image) for prior, layer in layers]
    variances = [
        np.tile(np.asarray(prior.variance, np.float32), (len(b), 1))
        for (prior, _), b in zip(layers, boxes, strict=True)
    ]
    return np.concatenate(boxes), np.concatenate(variances)


@dataclass(frozen=True, slots=True)
class DetectionOutput:
    """Decode box encodings against their anchors, then keep per class the boxes scored
    above ``confidence_threshold``, at most ``top_k`` best of them into greedy NMS at
    ``nms_threshold``, and of all classes the ``keep_top_k`` best."""

    num_classes: int
    background_label_id: int
    confidence_threshold: float
    nms_threshold: float
    top_k: int
    keep_top_k: int
    clip: bool = False

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> DetectionOutput:
        if attrs.get("code_type", "CENTER_SIZE").upper() != "CENTER_SIZE" or not attrs.get("share_location", True):
            raise ValueError("DetectionOutput: only CENTER_SIZE codes with shared locations are supported")
        if attrs.get("variance_encoded_in_target", False) or not attrs.get("normalized_bbox", True):
            raise ValueError("DetectionOutput: only normalized boxes with variances in the priors are supported")
        return cls(
            num_classes=int(attrs["num_classes"]),
            background_label_id=int(attrs["background_label_id"]),
            confidence_threshold=float(attrs.get("confidence_threshold", 0.0)),
            nms_threshold=float(attrs["nms_threshold"]),
            top_k=int(attrs.get("top_k", -1)),
            keep_top_k=int(attrs["keep_top_k"]),
            clip=bool(attrs.get("clip", False)),
        )

    def __call__(
        self, locations: Floats, scores: Floats, priors: Floats, variances: Floats, min_score: float = 0.0
    ) -> list[tuple[int, float, Floats]]:
        """``(class id, score, box)`` of what is found, best first (as OpenCV gives them).

        ``locations``: ``N x 4`` encodings ``(x, y, w, h)``; ``scores``: ``N x classes``;
        ``priors`` and ``variances``: ``N x 4``. ``min_score`` leaves out weaker boxes
        before suppression: NMS is greedy in score order within a class, so a box is kept
        or suppressed only by stronger ones, and the result above ``min_score`` is the same.
        """
        boxes = _decode(locations, priors, variances)
        if self.clip:
            boxes = np.clip(boxes, 0, 1)
        floor = np.float32(self.confidence_threshold)
        kept: list[tuple[float, int, int]] = []  # score, class, box index
        classes = [c for c in range(self.num_classes) if c != self.background_label_id]
        candidates = (scores > floor) & (scores >= np.float32(min_score))
        for c in np.flatnonzero(candidates[:, classes].any(axis=0)):
            label = classes[c]
            index = np.flatnonzero(candidates[:, label])
            order = index[np.argsort(-scores[index, label], kind="stable")]
            if self.top_k > -1:
                order = order[: self.top_k]
            limit = self.keep_top_k if len(classes) == 1 else None
            kept += [(float(scores[i, label]), label, i) for i in _nms(boxes, order, np.float32(self.nms_threshold),
                                                                       limit)]  # fmt: skip
        if self.keep_top_k > -1 and len(kept) > self.keep_top_k:
            kept = sorted(kept, key=lambda k: -k[0])[: self.keep_top_k]
        kept.sort(key=lambda k: -k[0])
        return [(label, score, boxes[i]) for score, label, i in kept]


def _decode(locations: Floats, priors: Floats, variances: Floats) -> Floats:
    """CENTER_SIZE decoding: the encoding shifts the anchor's centre by a share of its
    size and scales its size exponentially, each scaled by the anchor's variance."""
    size = priors[:, 2:] - priors[:, :2]
    centre = priors[:, :2] + size * np.float32(0.5)
    new_centre = variances[:, :2] * locations[:, :2] * size + centre
    half = np.exp(variances[:, 2:] * locations[:, 2:]) * size * np.float32(0.5)
    return np.concatenate([new_centre - half, new_centre + half], axis=1).astype(np.float32)


def _nms(boxes: Floats, order: npt.NDArray[np.intp], threshold: np.float32, limit: int | None) -> list[int]:
    """Greedy suppression in ``order``: a box is kept when its overlap (IoU) with every
    box kept before it is at most ``threshold``."""
    kept: list[int] = []
    area = _area(boxes[order])
    for n, i in enumerate(order):
        if kept:
            others = boxes[kept]
            inter = _area(np.concatenate([np.maximum(others[:, :2], boxes[i, :2]),
                                          np.minimum(others[:, 2:], boxes[i, 2:])], axis=1))  # fmt: skip
            union = area[n] + _area(others) - inter
            overlap = np.where(inter > 0, inter / np.where(union > 0, union, 1), 0)
            if (overlap > threshold).any():
                continue
        kept.append(int(i))
        if limit is not None and len(kept) >= limit:
            break
    return kept


def _area(boxes: Floats) -> Floats:
    """Areas, 0 for a box whose corners are the wrong way round."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return np.where((w < 0) | (h < 0), np.float32(0), w * h).astype(np.float32)

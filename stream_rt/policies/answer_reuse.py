"""Answer reuse, the cheapest early exit: skip the model call and repeat the last answer
when the scene and the question have not changed since it was given.

The scene is summarised by a :func:`scene_signature`: the frame's luma averaged over a
16x16 grid (0..1). Two signatures differ by the share of cells whose mean moved by more
than ``CELL_CHANGE`` (8 luma levels): a person crossing a corner changes a few cells a
lot, which a mean over all cells would hide, while sensor noise moves none. A call is
skipped when that share is at most ``threshold``, the question is the same, and the last
answer is younger than ``max_age_s`` (of media time) and was valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stream_rt.graph.packets import MllmAnswer

GRID = 16
CELL_CHANGE = 8 / 255


def scene_signature(y: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """The mean luma of each cell of a 16x16 grid over the frame, 0..1."""
    h, w = y.shape
    step = max(1, min(h, w) // (GRID * 8))  # sample about 8x8 pixels per cell
    sampled = y[::step, ::step].astype(np.float32)
    rows = np.array_split(np.arange(sampled.shape[0]), GRID)
    cols = np.array_split(np.arange(sampled.shape[1]), GRID)
    grid = np.array([[sampled[r[0] : r[-1] + 1, c[0] : c[-1] + 1].mean() for c in cols] for r in rows])
    return (grid / 255.0).astype(np.float32)


def signature_distance(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    """The share of grid cells that changed (0..1)."""
    return float((np.abs(a - b) > CELL_CHANGE).mean())


@dataclass
class _Last:
    question: str
    signature: npt.NDArray[np.float32]
    pts_ns: int
    answer: MllmAnswer


class AnswerReuse:
    def __init__(self, threshold: float = 0.02, max_age_s: float = 120.0) -> None:
        self.threshold = threshold
        self.max_age_ns = int(max_age_s * 1e9)
        self._last: dict[str, _Last] = {}

    def lookup(
        self, source_id: str, question: str, signature: npt.NDArray[np.float32] | None, pts_ns: int
    ) -> MllmAnswer | None:
        """The answer to reuse for this request, or ``None`` to call the model."""
        last = self._last.get(source_id)
        if self.threshold <= 0 or signature is None or last is None or last.question != question:
            return None
        if pts_ns - last.pts_ns > self.max_age_ns:
            return None
        if signature_distance(signature, last.signature) > self.threshold:
            return None
        return last.answer

    def remember(
        self, source_id: str, question: str, signature: npt.NDArray[np.float32] | None, pts_ns: int, answer: MllmAnswer
    ) -> None:
        if answer.status == "ok" and signature is not None:
            self._last[source_id] = _Last(question, signature, pts_ns, answer)

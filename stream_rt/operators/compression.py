"""Audio-guided visual token compression for multi-frame requests (OmniZip style),
model-agnostic: it decides which visual tokens of each frame to keep; the MLLM backend
applies the decision.

1. The frames are grouped into windows of ~2 s. Each window gets an audio salience
   ``S_a`` in 0..1. For a model that hears the clip (its sound goes to the model as audio
   tokens), it is OmniZip's own: the model's audio encoder ranks the audio tokens by the
   attention each received in its last layer, the top ``audio_keep`` (70 %) are kept
   (:func:`keep_heard`), and ``S_a`` is the share of the window's audio tokens kept.
   Otherwise it is the cheap stand-in a streaming runtime can afford: the share of the
   window's audio chunks judged salient (speech probability at least 0.5, a level well
   above the noise floor, or an onset).
2. A window keeps ``clip(0.25 + 0.40 * S_a, low, high)`` of its visual tokens (OmniZip's
   prune ratio ``0.75 - 0.40 * S_a`` turned into a keep rate), then all rates are rescaled
   so their token-weighted mean is the configured ``average`` (default 40 %): more sound,
   more video.
3. Within a window, frames alternate: even frames keep their most representative tokens
   (density-peak clustering over k nearest neighbours), odd frames the tokens that changed
   most from the same position in the previous frame.

Kept tokens keep their original position ids (gaps are allowed). ``mode="uniform"`` keeps
the same share of every frame — the baseline at the same budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from stream_rt.graph.packets import AudioFeatures

F32 = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]


@dataclass(frozen=True)
class FrameTokens:
    """One frame's visual tokens: their features (n, d) and original position ids (n,)."""

    pts_ns: int
    features: F32
    positions: Ints


@dataclass(frozen=True)
class HeardTokens:
    """A clip's audio tokens as the model heard them: each one's time and whether it is
    kept (:func:`keep_heard`)."""

    pts_ns: Ints
    kept: npt.NDArray[np.bool_]


def keep_heard(attention: F32, share: float = 0.7) -> npt.NDArray[np.bool_]:
    """Which audio tokens to keep: the top ``share`` by the attention each received in the
    audio encoder's last layer (OmniZip), at least one."""
    n = len(attention)
    keep = np.zeros(n, bool)
    if n:
        keep[np.argsort(-np.asarray(attention, np.float64), kind="stable")[: max(1, round(share * n))]] = True
    return keep


def heard_salience(heard: HeardTokens, lo_ns: int, hi_ns: int) -> float:
    """The share of the audio tokens in [lo_ns, hi_ns) kept (0 without any)."""
    inside = (heard.pts_ns >= lo_ns) & (heard.pts_ns < hi_ns)
    return float(heard.kept[inside].mean()) if inside.any() else 0.0


def audio_salience(chunks: list[AudioFeatures], floor_margin_db: float = 10.0, onset: float = 3.0) -> float:
    """The share of these audio chunks that are salient (0 without audio)."""
    if not chunks:
        return 0.0
    salient = [
        (c.speech is not None and c.speech >= 0.5) or c.level_dbfs >= c.floor_dbfs + floor_margin_db or c.onset >= onset
        for c in chunks
    ]
    return float(np.mean(salient))


def window_keep_rates(
    scores: list[float], sizes: list[int], average: float = 0.4, low: float = 0.25, high: float = 0.65
) -> list[float]:
    """Keep rate per window from its audio salience, rescaled so the token-weighted mean
    is ``average`` (within the clip bounds)."""
    if not scores:
        return []
    if not low <= average <= high:
        raise ValueError(f"the average keep rate {average} must lie within [{low}, {high}]")
    raw = np.clip(0.25 + 0.40 * np.asarray(scores, np.float64), low, high)
    weights = np.asarray(sizes, np.float64) / max(float(np.sum(sizes)), 1.0)

    def mean_with(shift: float) -> float:
        return float((np.clip(raw + shift, low, high) * weights).sum())

    lo, hi = -1.0, 1.0  # the mean grows with the shift: bisect for the average
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_with(mid) < average else (lo, mid)
    return [float(r) for r in np.clip(raw + (lo + hi) / 2, low, high)]


def density_peaks(features: F32, keep: int, neighbours: int = 5) -> Ints:
    """The ``keep`` most representative tokens: high local density (k nearest neighbours)
    times distance to any denser token (DPC-KNN), best first."""
    n = len(features)
    if keep >= n:
        return np.arange(n, dtype=np.int64)
    x = features.astype(np.float64)
    squared = (x * x).sum(axis=1)
    # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b: an (n, n) matrix, never an (n, n, dim) one.
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * (x @ x.T), 0.0))
    np.fill_diagonal(distances, 0.0)
    k = min(neighbours, n - 1)
    nearest = np.sort(distances, axis=1)[:, 1 : k + 1]
    density = np.exp(-(nearest**2).mean(axis=1))
    denser = density[None, :] > density[:, None]
    delta = np.where(denser, distances, np.inf).min(axis=1)
    delta[np.isinf(delta)] = distances.max()
    return np.argsort(-(density * delta), kind="stable")[:keep].astype(np.int64)


def most_changed(features: F32, previous: F32 | None, keep: int) -> Ints:
    """The ``keep`` tokens least similar (cosine) to the same position in the previous frame."""
    n = len(features)
    if keep >= n:
        return np.arange(n, dtype=np.int64)
    if previous is None or previous.shape != features.shape:
        return density_peaks(features, keep)
    a = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    b = previous / np.maximum(np.linalg.norm(previous, axis=1, keepdims=True), 1e-12)
    return np.argsort((a * b).sum(axis=1), kind="stable")[:keep].astype(np.int64)


def compress(
    frames: list[FrameTokens],
    audio: list[AudioFeatures],
    *,
    window_s: float = 2.0,
    average: float = 0.4,
    mode: Literal["audio", "uniform"] = "audio",
    heard: HeardTokens | None = None,
) -> list[Ints]:
    """The positions to keep in each frame (sorted original position ids); with ``heard``
    (a model that hears the clip), the windows' audio salience is the share of their audio
    tokens kept, else it comes from ``audio``'s features."""
    if not frames:
        return []
    start = frames[0].pts_ns
    window_ns = int(window_s * 1e9)
    window_of = [(f.pts_ns - start) // window_ns for f in frames]
    windows = sorted(set(window_of))
    sizes = [sum(len(f.positions) for f, w in zip(frames, window_of, strict=True) if w == win) for win in windows]
    if mode == "uniform":
        rates = [average] * len(windows)
    else:
        scores = []
        for win in windows:
            lo, hi = start + win * window_ns, start + (win + 1) * window_ns
            scores.append(
                heard_salience(heard, lo, hi)
                if heard is not None
                else audio_salience([c for c in audio if lo <= c.pts_ns < hi])
            )
        rates = window_keep_rates(scores, sizes, average)
    rate_of = dict(zip(windows, rates, strict=True))
    kept: list[Ints] = []
    previous: F32 | None = None
    index_in_window = 0
    for i, frame in enumerate(frames):
        if i and window_of[i] != window_of[i - 1]:
            index_in_window = 0
        keep = max(1, round(rate_of[window_of[i]] * len(frame.positions)))
        chosen = (
            density_peaks(frame.features, keep)
            if index_in_window % 2 == 0
            else most_changed(frame.features, previous, keep)
        )
        kept.append(np.sort(frame.positions[chosen]))
        previous = frame.features
        index_in_window += 1
    return kept

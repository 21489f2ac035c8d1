"""Sentence vectors of the history, quantised to int8 and searched by brute force in memory.

A unit vector ``v`` is stored as ``round(v / max|v| * 127)`` (int8) with its scale
``max|v| / 127``; the cosine similarity of two stored vectors is the integer dot product
of their int8 codes times both scales (error well under 0.01 for 384-dimensional
sentence embeddings). :func:`quantize` makes the codes; :class:`VectorIndex` holds them
for every entry of a history (384 bytes each: 1,000,000 entries take 384 MB), with each
entry's wall time and source, and scores all of them against a query in one pass of a
Numba kernel that runs without the GIL (about 20 ms per million entries on one core).
The history loads the index from SQLite once and then appends what was stored since.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit


def quantize(vectors: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """int8 codes ``(n, dim)`` and their scales ``(n,)`` of ``vectors`` ``(n, dim)``."""
    vectors = np.asarray(vectors, np.float32)
    scales = np.maximum(np.abs(vectors).max(axis=1), 1e-12) / 127.0
    codes = np.clip(np.rint(vectors / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales.astype(np.float32)


@njit(nogil=True, cache=True)
def _dots(
    codes: npt.NDArray[np.int8], query: npt.NDArray[np.int8], out: npt.NDArray[np.int32]
) -> None:  # pragma: no cover - compiled
    for i in range(codes.shape[0]):
        total = np.int32(0)
        for j in range(codes.shape[1]):
            total += np.int32(codes[i, j]) * np.int32(query[j])
        out[i] = total


class VectorIndex:
    """The int8 codes of entries (``ids``, increasing as appended), their scales, wall
    times and source numbers; grows by doubling, so appending is amortised O(1)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.size = 0
        self._ids = np.empty(0, np.int64)
        self._codes = np.empty((0, dim), np.int8)
        self._scales = np.empty(0, np.float32)
        self._wall = np.empty(0, np.int64)
        self._source = np.empty(0, np.int32)
        self._sources: dict[str, int] = {}

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays in use."""
        n = self.size
        return n * (self.dim + 8 + 4 + 8 + 4)

    def append(
        self,
        ids: npt.NDArray[np.int64],
        codes: npt.NDArray[np.int8],
        scales: npt.NDArray[np.float32],
        wall_ns: npt.NDArray[np.int64],
        sources: list[str],
    ) -> None:
        n = len(ids)
        if self.size + n > len(self._ids):
            capacity = max(self.size + n, 2 * len(self._ids), 1024)
            self._ids = _grown(self._ids, capacity)
            self._codes = _grown(self._codes, capacity)
            self._scales = _grown(self._scales, capacity)
            self._wall = _grown(self._wall, capacity)
            self._source = _grown(self._source, capacity)
        end = self.size + n
        self._ids[self.size : end] = ids
        self._codes[self.size : end] = codes
        self._scales[self.size : end] = scales
        self._wall[self.size : end] = wall_ns
        self._source[self.size : end] = [self._sources.setdefault(s, len(self._sources)) for s in sources]
        self.size = end

    def keep(self, alive: npt.NDArray[np.bool_]) -> None:
        """Keep only the entries where ``alive`` (one flag per entry, in order) is true."""
        n = int(alive.sum())
        for name in ("_ids", "_codes", "_scales", "_wall", "_source"):
            array = getattr(self, name)
            kept = array[: self.size][alive]
            setattr(self, name, _grown(kept, max(n, 1024)))
        self.size = n

    @property
    def ids(self) -> npt.NDArray[np.int64]:
        return self._ids[: self.size]

    def search(
        self,
        query: npt.NDArray[np.float32],
        k: int,
        source: str | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
    ) -> list[tuple[int, float]]:
        """The ``k`` entries most similar to the unit vector ``query`` among those of
        ``source`` with a wall time in [since_ns, until_ns]: ``(id, cosine)``, best first."""
        if self.size == 0:
            return []
        codes, scales = quantize(query[None, :])
        dots = np.empty(self.size, np.int32)
        _dots(self._codes[: self.size], codes[0], dots)
        scores = dots.astype(np.float32) * self._scales[: self.size] * scales[0]
        mask = None
        if source is not None:
            number = self._sources.get(source)
            if number is None:
                return []
            mask = self._source[: self.size] == number
        if since_ns is not None:
            mask = (self._wall[: self.size] >= since_ns) & (True if mask is None else mask)
        if until_ns is not None:
            mask = (self._wall[: self.size] <= until_ns) & (True if mask is None else mask)
        if mask is not None:
            scores[~mask] = -np.inf
        k = min(k, self.size)
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return [(int(self._ids[i]), float(scores[i])) for i in best if np.isfinite(scores[i])]


def _grown(array: npt.NDArray[Any], capacity: int) -> npt.NDArray[Any]:
    grown = np.empty((capacity, *array.shape[1:]), array.dtype)
    grown[: len(array)] = array[:capacity]
    return grown

"""A fixed-size streaming memory per source: what happened, compactly, however long the
daemon runs.

Each :class:`MemoryEntry` holds a few pooled visual tokens (``tokens`` x ``dim``), the text
of what was said about that moment (answers, event metadata) with its sentence embedding,
and its time span. A source never holds more than ``max_entries`` entries, so its token
budget (``max_entries * tokens``) never grows: when a new entry would exceed it, the two
adjacent entries that are most alike (cosine similarity of their visual tokens) are
merged into one — a size-weighted mean of their tokens and embeddings, their texts joined,
their spans united (MA-LMM). The first ``anchors`` entries of a source are never merged
(StreamingLLM's sinks: how the stream began stays visible).

Queries: the most recent entries, those overlapping a time range, and those whose text is
closest to a query sentence (real embeddings, :mod:`stream_rt.memory.embeddings`).
:meth:`StreamingMemory.save` writes one ``.npz`` file (no pickle) atomically;
:meth:`StreamingMemory.load` restores it after a restart.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

FORMAT_VERSION = 1


class Embedder(Protocol):
    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]: ...


@dataclass
class MemoryEntry:
    source_id: str
    start_ns: int
    end_ns: int
    visual: npt.NDArray[np.float32]  # (tokens, dim)
    text: str = ""
    embedding: npt.NDArray[np.float32] | None = None  # unit vector, or None without text
    weight: int = 1  # how many original entries it stands for
    event_ids: list[str] = field(default_factory=list)


class StreamingMemory:
    def __init__(
        self,
        max_entries: int = 16,
        anchors: int = 2,
        tokens: int = 16,
        dim: int | None = None,
        max_text: int = 1000,
        embedder: Embedder | None = None,
    ) -> None:
        if not 0 <= anchors < max_entries - 1:
            raise ValueError(f"anchors must leave room to merge: 0 <= anchors < max_entries - 1, got {anchors}")
        self.max_entries = max_entries
        self.anchors = anchors
        self.tokens = tokens
        self.dim = dim
        self.max_text = max_text
        self.embedder = embedder
        self.counters: Counter[str] = Counter()
        self._entries: dict[str, list[MemoryEntry]] = {}

    @property
    def token_budget(self) -> int:
        """Visual tokens one source can hold at most."""
        return self.max_entries * self.tokens

    @property
    def sources(self) -> list[str]:
        return list(self._entries)

    def entries(self, source_id: str) -> list[MemoryEntry]:
        return list(self._entries.get(source_id, []))

    def add(
        self,
        source_id: str,
        start_ns: int,
        end_ns: int,
        visual: npt.NDArray[np.float32],
        text: str = "",
        event_ids: list[str] | None = None,
    ) -> None:
        """Remember a moment; merges the most alike neighbours if the source is full."""
        visual = np.asarray(visual, np.float32)
        if visual.ndim != 2 or visual.shape[0] != self.tokens or (self.dim and visual.shape[1] != self.dim):
            raise ValueError(
                f"memory entries hold ({self.tokens}, {self.dim or 'dim'}) visual tokens, got {visual.shape}"
            )
        self.dim = visual.shape[1]
        embedding = self.embedder.embed([text])[0] if text and self.embedder is not None else None
        entries = self._entries.setdefault(source_id, [])
        entries.append(MemoryEntry(source_id, start_ns, end_ns, visual, text[-self.max_text :], embedding, 1,
                                   list(event_ids or [])))  # fmt: skip
        self.counters["added"] += 1
        while len(entries) > self.max_entries:
            self._merge_most_alike(entries)

    def _merge_most_alike(self, entries: list[MemoryEntry]) -> None:
        flat = np.stack([e.visual.ravel() for e in entries])
        flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
        similarity = (flat[:-1] * flat[1:]).sum(axis=1)  # between entry i and i + 1
        similarity[: self.anchors] = -np.inf  # pairs that touch an anchor
        i = int(np.argmax(similarity))
        a, b = entries[i], entries[i + 1]
        w = a.weight + b.weight
        text = " | ".join(t for t in (a.text, b.text) if t)[-self.max_text :]
        embedding = None
        if a.embedding is not None or b.embedding is not None:
            having = [e for e in (a, b) if e.embedding is not None]
            weights = np.array([e.weight for e in having], np.float32)[:, None]
            mean = (np.stack([e.embedding for e in having if e.embedding is not None]) * weights).sum(0) / weights.sum()
            embedding = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
        entries[i : i + 2] = [
            MemoryEntry(
                a.source_id, min(a.start_ns, b.start_ns), max(a.end_ns, b.end_ns),
                ((a.visual * a.weight + b.visual * b.weight) / w).astype(np.float32), text, embedding, w,
                (a.event_ids + b.event_ids)[-16:],
            )
        ]  # fmt: skip
        self.counters["merges"] += 1

    def recent(self, source_id: str, k: int = 4) -> list[MemoryEntry]:
        return self.entries(source_id)[-k:]

    def between(self, source_id: str, start_ns: int, end_ns: int) -> list[MemoryEntry]:
        """Entries whose span overlaps [start_ns, end_ns]."""
        return [e for e in self._entries.get(source_id, []) if e.end_ns >= start_ns and e.start_ns <= end_ns]

    def search(self, query: str, source_id: str | None = None, k: int = 3) -> list[tuple[float, MemoryEntry]]:
        """The ``k`` entries whose text is closest to ``query`` (cosine similarity, best first)."""
        if self.embedder is None:
            raise RuntimeError("text search needs an embedder (StreamingMemory(embedder=TextEmbedder()))")
        pool = [
            e for sid, es in self._entries.items() if source_id in (None, sid) for e in es if e.embedding is not None
        ]
        if not pool:
            return []
        q = self.embedder.embed([query])[0]
        scores = np.stack([e.embedding for e in pool if e.embedding is not None]) @ q
        order = np.argsort(-scores)[:k]
        return [(float(scores[i]), pool[i]) for i in order]

    def save(self, path: str | Path) -> None:
        """Write every source's entries to one ``.npz`` file, atomically (no pickle)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta: list[dict[str, object]] = []
        arrays: dict[str, npt.NDArray[np.generic]] = {}
        for n, entry in enumerate(e for es in self._entries.values() for e in es):
            meta.append({"source_id": entry.source_id, "start_ns": entry.start_ns, "end_ns": entry.end_ns,
                         "text": entry.text, "weight": entry.weight, "event_ids": entry.event_ids,
                         "embedding": entry.embedding is not None})  # fmt: skip
            arrays[f"visual_{n}"] = entry.visual
            if entry.embedding is not None:
                arrays[f"embedding_{n}"] = entry.embedding
        header = {"version": FORMAT_VERSION, "max_entries": self.max_entries, "tokens": self.tokens, "entries": meta}
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
        fd, tmp = tempfile.mkstemp(prefix=".memory-", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                np.savez(out, **arrays)  # type: ignore[arg-type]
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load(self, path: str | Path) -> None:
        """Restore what :meth:`save` wrote (entries beyond this memory's size are merged).
        A file that cannot be read raises and leaves the memory as it was."""
        with np.load(Path(path), allow_pickle=False) as data:
            header = json.loads(bytes(data["header"]).decode())
            if header.get("version") != FORMAT_VERSION:
                raise ValueError(f"{path}: memory snapshot version {header.get('version')} is not {FORMAT_VERSION}")
            loaded: dict[str, list[MemoryEntry]] = {}
            for n, m in enumerate(header["entries"]):
                entry = MemoryEntry(
                    m["source_id"], int(m["start_ns"]), int(m["end_ns"]), data[f"visual_{n}"].astype(np.float32),
                    m["text"], data[f"embedding_{n}"].astype(np.float32) if m["embedding"] else None,
                    int(m["weight"]), list(m["event_ids"]),
                )  # fmt: skip
                entries = loaded.setdefault(entry.source_id, [])
                entries.append(entry)
                while len(entries) > self.max_entries:
                    self._merge_most_alike(entries)
        self._entries = loaded  # only once all of it was read
        self.dim = next((es[0].visual.shape[1] for es in loaded.values() if es), self.dim)

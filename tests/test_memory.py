"""The fixed-size streaming memory: bounded entries and tokens, merges of the most alike
neighbours, anchors, queries with real sentence embeddings, and a restart that restores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream_rt.memory import StreamingMemory
from stream_rt.memory.embeddings import TextEmbedder

S = 1_000_000_000


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return TextEmbedder()


def scene(seed: int, tokens: int = 4, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(tokens, dim)).astype(np.float32)


def test_a_source_never_holds_more_than_its_entries_and_token_budget() -> None:
    memory = StreamingMemory(max_entries=6, anchors=2, tokens=4)
    for i in range(200):
        memory.add("gate", i * S, i * S + S // 2, scene(i % 7))
        entries = memory.entries("gate")
        assert len(entries) <= 6 and sum(e.visual.shape[0] for e in entries) <= memory.token_budget
    entries = memory.entries("gate")
    assert sum(e.weight for e in entries) == 200, "merged entries account for every moment"
    assert [e.start_ns for e in entries] == sorted(e.start_ns for e in entries) and entries[
        -1
    ].end_ns == 199 * S + S // 2
    assert [e.weight for e in entries[:2]] == [1, 1], "the anchors (how the stream began) are never merged"
    assert memory.counters["merges"] == 194


def test_the_most_alike_adjacent_pair_is_merged_by_size_weighted_mean() -> None:
    memory = StreamingMemory(max_entries=4, anchors=1, tokens=4)
    base, other = scene(1), scene(2)
    near = base + 0.01  # almost the same picture as entry 2
    for i, visual in enumerate([scene(0), other, base, near]):
        memory.add("gate", i * S, i * S, visual, text=f"moment {i}")
    memory.add("gate", 4 * S, 4 * S, scene(3), text="moment 4")
    entries = memory.entries("gate")
    assert [e.weight for e in entries] == [1, 1, 2, 1]
    merged = entries[2]
    assert (merged.start_ns, merged.end_ns) == (2 * S, 3 * S)
    assert np.allclose(merged.visual, (base + near) / 2) and merged.text == "moment 2 | moment 3"
    memory.add("gate", 5 * S, 5 * S, scene(3))  # the same as the last one: they merge (weight 2)
    memory.add("gate", 6 * S, 6 * S, scene(3) + 0.03)  # joins that weight-2 entry, weighted 2:1
    entries = memory.entries("gate")
    assert [e.weight for e in entries] == [1, 1, 2, 3]
    assert np.allclose(entries[3].visual, scene(3) + 0.01, atol=1e-6)


def test_queries_by_recency_time_and_text(embedder: TextEmbedder) -> None:
    memory = StreamingMemory(max_entries=8, anchors=1, tokens=4, embedder=embedder)
    said = [
        "a delivery van stops at the gate",
        "two people walk along the path",
        "a dog runs across the lawn",
        "the gate is left open",
    ]
    for i, text in enumerate(said):
        memory.add("gate", i * 10 * S, (i * 10 + 5) * S, scene(i), text=text, event_ids=[f"gate-{i}"])
    memory.add("yard", 0, S, scene(9), text="a cat sleeps on the wall")
    assert [e.text for e in memory.recent("gate", 2)] == said[2:]
    assert [e.event_ids for e in memory.between("gate", 12 * S, 26 * S)] == [["gate-1"], ["gate-2"]]
    best = memory.search("an animal in the garden", source_id="gate", k=2)
    assert best[0][1].text == "a dog runs across the lawn" and best[0][0] > best[1][0]
    assert memory.search("a truck delivering a parcel", k=1)[0][1].event_ids == ["gate-0"]
    assert memory.search("a sleeping pet")[0][1].source_id == "yard"


def test_a_restart_restores_the_memory(tmp_path: Path, embedder: TextEmbedder) -> None:
    memory = StreamingMemory(max_entries=5, anchors=1, tokens=4, embedder=embedder)
    for i in range(12):
        memory.add("gate", i * S, i * S, scene(i % 3), text=f"event number {i}", event_ids=[f"gate-{i}"])
    path = tmp_path / "memory.npz"
    memory.save(path)
    restored = StreamingMemory(max_entries=5, anchors=1, tokens=4, embedder=embedder)
    restored.load(path)
    before, after = memory.entries("gate"), restored.entries("gate")
    assert [(e.start_ns, e.end_ns, e.text, e.weight, e.event_ids) for e in after] == [
        (e.start_ns, e.end_ns, e.text, e.weight, e.event_ids) for e in before
    ]
    assert all(np.array_equal(a.visual, b.visual) for a, b in zip(before, after, strict=True))
    assert restored.search("event number 11")[0][1].event_ids[-1] == "gate-11"
    path.write_bytes(b"not a snapshot")
    with pytest.raises(ValueError):
        restored.load(path)
    assert restored.entries("gate"), "a failed load leaves the memory as it was"


def test_entries_of_the_wrong_shape_are_refused() -> None:
    memory = StreamingMemory(max_entries=4, anchors=1, tokens=4)
    memory.add("gate", 0, 0, scene(0))
    with pytest.raises(ValueError, match=r"hold \(4, 8\) visual tokens"):
        memory.add("gate", 1, 1, scene(1, tokens=4, dim=16))

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


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3", "qwen3_vl", "gemma3"])
def test_the_reused_memory_prefix_gives_the_logits_of_recomputing_it(family: str, samples: Path) -> None:
    import av
    import torch

    from stream_rt.mllm.backends.call import SourceMemory
    from stream_rt.mllm.backends.transformers_backend import TransformersBackend
    from stream_rt.mllm.prompt import chat_messages
    from stream_rt.mllm.techniques.memory_prefix import MemoryPrefix, prefix_positions

    from .models import model_dir, own_forward, own_logits

    backend = TransformersBackend(str(model_dir(family)))
    backend.load()
    with av.open(str(samples / "vtest.avi")) as container:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(40), container.decode(video=0), strict=False)]
    # Entries made the way the stage makes them: the keyframe's pooled visual tokens.
    memory = StreamingMemory(max_entries=5, anchors=1, tokens=8)
    for i, frame in enumerate(frames[:20:5]):
        gen = backend.generate([frame], "What happens?", max_new_tokens=1, summary_tokens=8)
        assert gen.summary is not None and gen.summary.shape[0] == 8
        memory.add("walkway", i * S, i * S + S // 2, gen.summary, f"people walk by ({i})", [f"walkway-{i}"])
    entries = tuple(memory.entries("walkway"))

    first = backend.generate([frames[30]], "What happens?", max_new_tokens=1, memory=SourceMemory("walkway", entries))
    again = backend.generate([frames[35]], "What happens?", max_new_tokens=1, memory=SourceMemory("walkway", entries))
    assert backend.memory_prefix.computed == 1 and backend.memory_prefix.reused == 1
    assert first.memory_tokens == again.memory_tokens > 4 * 8

    # Recomputing everything in one pass, the prefix's embeddings followed by the prompt's.
    model, fam = backend.model, backend.family
    assert fam is not None
    with torch.inference_mode():
        prepared = fam.prepare([frames[35]], chat_messages(1, "What happens?"), model)
        features = fam.encode(model, prepared)
        prompt = backend.embed(prepared, features)
        prefix = MemoryPrefix().embeds(model, fam, entries)
        length = prefix.shape[1]
        positions = prepared.position_ids + length if prepared.position_ids is not None else None
        if positions is None:
            positions = torch.arange(length, length + prepared.length)[None]
        out = own_forward(  # the memory's pooled tokens are not an image's
            model, torch.cat([prefix, prompt], 1),
            torch.cat([prefix_positions(length, fam, prefix.device), positions], -1), None,
            torch.cat([prepared.image_mask.new_zeros(length), prepared.image_mask]), features.deepstack,
        )  # fmt: skip
        full = own_logits(model, out)
    assert again.first_logits is not None
    assert torch.allclose(again.first_logits, full, atol=1e-4), float((again.first_logits - full).abs().max())

    # A memory that gained an entry computes that entry only, after the kept ones: the same
    # K/V as computing the whole prefix afresh; a merge of the last two, from there on.
    memory.add("walkway", 30 * S, 31 * S, gen.summary, "a new moment")
    grown = tuple(memory.entries("walkway"))
    assert [e.text for e in grown[:-1]] == [e.text for e in entries], "the new entry comes last, the others kept"
    changed = backend.generate([frames[35]], "What happens?", max_new_tokens=1, memory=SourceMemory("walkway", grown))
    assert backend.memory_prefix.computed == 1 and backend.memory_prefix.extended == 1
    afresh = MemoryPrefix()
    with torch.inference_mode():
        whole = afresh.state(model, fam, "walkway", grown)
    kept = backend.memory_prefix.state(model, fam, "walkway", grown)
    assert changed.memory_tokens == kept.length == whole.length and afresh.computed == 1
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(kept.keys, whole.keys, strict=True))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(kept.values, whole.values, strict=True))
    memory.add("walkway", 32 * S, 33 * S, gen.summary, "another moment")  # full: two neighbours merge
    merged = tuple(memory.entries("walkway"))
    assert len(merged) == 5 and merged[0].text == entries[0].text and memory.counters["merges"] == 1
    backend.generate([frames[35]], "What happens?", max_new_tokens=1, memory=SourceMemory("walkway", merged))
    assert backend.memory_prefix.computed == 1 and backend.memory_prefix.extended == 2
    assert backend.generate([frames[35]], "What happens?", max_new_tokens=1).memory_tokens == 0


def clip_and_memory_config(samples: Path, smoke_model: Path, tmp_path: Path) -> dict[str, object]:
    from stream_rt.config import LOSSLESS_CHANNELS

    return {
        "sources": [{"id": "walkway", "url": str(samples / "walkway_speech.mkv")}],
        "graph": LOSSLESS_CHANNELS,
        "mllm": {
            "model": str(smoke_model), "reuse_threshold": 0, "flow": "block",
            "clip": {"frames": 6, "interval_s": 1.0, "keep": 0.4},
            "memory": {"enabled": True, "max_entries": 4, "anchors": 1, "tokens": 8,
                       "snapshot": str(tmp_path / "memory.npz"), "refresh": "call"},
        },
        "sinks": {"jsonl": {"path": str(tmp_path / "events.jsonl")}},
    }  # fmt: skip


async def test_a_replay_asks_about_compressed_clips_with_a_bounded_memory_that_survives_a_restart(
    samples: Path, tmp_path: Path
) -> None:
    import json

    from stream_rt.config import parse_config
    from stream_rt.mllm.smoke import build_smoke_model
    from stream_rt.pipeline import build_pipeline

    config = parse_config(clip_and_memory_config(samples, build_smoke_model(), tmp_path))
    pipeline = build_pipeline(config, speed=None)
    await pipeline.graph.run()
    records = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    answers = [r for r in records if r["kind"] == "MllmAnswer"]
    # (The smoke model was fitted without a memory prefix: with one its JSON may break.)
    assert len(answers) >= 6 and answers[0]["status"] == "ok" and {a["status"] for a in answers} <= {"ok", "invalid"}
    # Clips: several frames per call, 40 % of their visual tokens kept.
    stage = pipeline.mllm
    assert stage is not None
    compression = stage.backend.compression  # type: ignore[attr-defined]
    assert 0.3 < compression.last_kept < 0.5
    assert sum(a["tokens"].get("visual_dropped", 0) > 0 for a in answers) >= len(answers) - 1, "clips are compressed"
    # The memory: the first call has none, later ones carry it, bounded by 4 entries.
    memory_tokens = [a["tokens"].get("memory", 0) for a in answers]
    assert memory_tokens[0] == 0 and all(m > 0 for m in memory_tokens[1:])
    assert max(memory_tokens) == max(memory_tokens[4:]), "the prefix stops growing once the memory is full"
    stats = pipeline.graph.statistics()
    counters, gauges = stats["nodes"]["mllm"], stats["gauges"]["mllm"]
    assert counters["memory_added"] == len(answers) and counters["memory_merges"] == len(answers) - 4
    assert gauges["memory_entries"] == 4 and gauges["memory_visual_tokens"] == 4 * 8
    assert counters["tokens_memory"] == sum(memory_tokens)

    # A restart restores the memory: the first call of the next run already carries it.
    saved = StreamingMemory(4, 1, 8)
    saved.load(tmp_path / "memory.npz")
    assert len(saved.entries("walkway")) == 4, "the full memory was saved at stop"
    (tmp_path / "events.jsonl").unlink()
    pipeline = build_pipeline(parse_config(clip_and_memory_config(samples, build_smoke_model(), tmp_path)), speed=None)
    await pipeline.graph.run()
    again = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    first = next(r for r in again if r["kind"] == "MllmAnswer")
    assert first["tokens"]["memory"] > 0, "the first call carries the restored memory"


async def test_an_unreadable_memory_snapshot_is_set_aside_and_the_daemon_starts(samples: Path, tmp_path: Path) -> None:
    from stream_rt.config import parse_config
    from stream_rt.mllm.smoke import build_smoke_model
    from stream_rt.pipeline import build_pipeline

    (tmp_path / "memory.npz").write_bytes(b"not a snapshot")
    config = clip_and_memory_config(samples, build_smoke_model(), tmp_path)
    config["sources"] = [{"id": "walkway", "url": str(samples / "still_motion.mkv"), "audio": False}]
    pipeline = build_pipeline(parse_config(config), speed=None)
    await pipeline.graph.run()
    assert [p.name for p in tmp_path.glob("memory.npz.unreadable-*")], "the bad file is kept for a look"
    restored = StreamingMemory(4, 1, 8)
    restored.load(tmp_path / "memory.npz")  # written anew at stop
    assert restored.entries("walkway")


async def test_within_an_episode_the_memory_stays_as_it_began_so_prefix_and_token_reuse_carry(
    samples: Path, tmp_path: Path
) -> None:
    """refresh = "episode" (the default): a watch re-checking the still view (one check
    series, one id) sees the memory as the series began — its prefix K/V computed once,
    token reuse reusing with the memory before the prompt — although every answer adds an
    entry."""
    import json

    import numpy as np

    from stream_rt.config import parse_config
    from stream_rt.mllm.smoke import build_smoke_model
    from stream_rt.pipeline import build_pipeline

    snapshot = tmp_path / "memory.npz"
    kept = StreamingMemory(4, 1, 8)
    rng = np.random.default_rng(0)
    for i in range(2):  # what an earlier run left (the tiny model's hidden size is 64)
        kept.add("walkway", i * S, i * S + S // 2, rng.normal(0, 0.02, (8, 64)).astype(np.float32), f"earlier {i}")
    kept.save(snapshot)
    config = clip_and_memory_config(samples, build_smoke_model(), tmp_path)
    config["sources"] = [{"id": "walkway", "url": str(samples / "still_motion.mkv"), "audio": False}]
    config["mllm"] = {**config["mllm"], "clip": {"frames": 1}, "token_reuse": {"enabled": True},  # type: ignore[dict-item]
                      "memory": {"enabled": True, "max_entries": 4, "anchors": 1, "tokens": 8,
                                 "snapshot": str(snapshot)}}  # fmt: skip
    config["watches"] = [{"id": "guests", "source": "walkway", "condition": "a guest is at the door", "recheck_s": 2}]
    pipeline = build_pipeline(parse_config(config), speed=None)
    await pipeline.graph.run()
    records = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    checks = {r["event_id"] for r in records if r["kind"] == "Event" and r["type"] == "check" and r["pts_ns"] < 19e9}
    assert len(checks) == 1, "one series of re-checks over the still view"
    calls = [r for r in records if r["kind"] == "MllmAnswer" and r["event_id"] in checks]
    assert len(calls) >= 5
    assert {c["tokens"]["memory"] for c in calls} == {calls[0]["tokens"]["memory"]} and calls[0]["tokens"]["memory"] > 0
    assert all(c["tokens"]["visual_reused"] > 0 for c in calls[1:]), "token reuse with the memory before the prompt"
    stats = pipeline.graph.statistics()["nodes"]["mllm"]
    assert stats["memory_added"] >= len(calls), "every answer still leaves an entry, for the next episode"

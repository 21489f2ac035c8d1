#!/usr/bin/env python3
"""Audio-guided token compression on the audio-visual sample (real video, real speech).

Multi-frame requests — 8 s of walkway_speech.mkv at ``--fps`` frames per second (default
2: 16 frames), each frame scaled to fit one 512 px tile (64 visual tokens) — on the realistic-size config
(SmolVLM-256M shaped, random weights), answered three ways in the same run: uncompressed,
audio-guided compression at a 40 % average keep rate, and uniform compression at the
same budget. Per request: prefill time and end-to-end time (encode + prefill + 16
decoded tokens), fidelity against the uncompressed request over the answer positions (the
uncompressed call's 16 greedy tokens fed to both, next-token top-1 agreement and mean
KL), and the share of the kept visual tokens that fall in 2 s windows with speech.
Requests are centred on each labelled speech start.

The memory prefix: a full memory (16 entries of 16 pooled tokens and 32 text tokens, made
from real keyframes) before a one-frame request (one tile), prefilled with the prefix's K/V reused
vs computed again, alternating; and the largest logit difference between the two.

The long replay (``--replay-frames``, default 1,000,000): a synthetic source through every
stage (change, audio, salience, trigger, MLLM stage with clips, compression and memory on
the smoke model, flow "latest") as fast as it goes, in a child process that samples its
RSS, the memory's entries and visual tokens, and the frames done every 2 s; the series is
written to ``benchmarks/series/long_replay.csv``. RSS growth is the median of the last
tenth of the samples over the median of the tenth after the warm-up (the first fifth).

Usage: python benchmarks/compress_memory.py [--requests 5] [--replay-frames 1000000]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from common import answer_fidelity, audio_features, copy_cache, kv_of, one_tile_per_frame, rss_growth, rss_mb

from stream_rt import AudioFeatures
from stream_rt.media.images import resize
from stream_rt.mllm.backends.call import SourceMemory
from stream_rt.mllm.backends.transformers_backend import TransformersBackend
from stream_rt.mllm.prompt import chat_messages
from stream_rt.mllm.smoke import build_smoke_model
from stream_rt.mllm.techniques.compression import Compression

ROOT = Path(__file__).resolve().parent.parent
CLIP = ROOT / "samples" / "walkway_speech.mkv"
NEW_TOKENS = 16
QUESTION = "What is happening, and is anyone speaking?"


def clip_frames(seconds: list[float]) -> tuple[list[np.ndarray], list[int]]:
    images, pts = [], []
    with av.open(str(CLIP)) as container:
        for frame in container.decode(video=0):
            if len(images) < len(seconds) and frame.time is not None and frame.time >= seconds[len(images)]:
                images.append(resize(frame.to_ndarray(format="rgb24"), 512))
                pts.append(int(frame.time * 1e9))
    return images, pts


def one(backend: TransformersBackend, images: list[np.ndarray], pts: list[int], audio: list[AudioFeatures],
        compression: Compression | None) -> dict[str, Any]:  # fmt: skip
    family, model = backend.family, backend.model
    assert family is not None
    with torch.inference_mode():
        started = time.perf_counter()
        prepared = family.prepare(images, chat_messages(len(images), QUESTION), model)
        features = family.encode(model, prepared)
        t1 = time.perf_counter()
        if compression is not None:
            prepared, features, _ = compression.apply(family, prepared, features, pts, audio)
        logits, cache = backend.prefill(prepared, features)
        t2 = time.perf_counter()
        kept_cache = copy_cache(backend, cache)
        ids, _, _ = backend.decode(prepared, logits, kv_of(cache), None, None, NEW_TOKENS)
        total = time.perf_counter() - started
    return {"prepared": prepared, "first": logits, "cache": kept_cache, "ids": ids, "prefill_s": t2 - t1,
            "total_s": total, "visual": int(prepared.image_mask.sum())}  # fmt: skip


def speech_share(full: Any, got: Any, pts: list[int], speech_windows: set[int]) -> float:
    """Share of the kept visual tokens that belong to frames in 2 s windows with speech."""
    visual = torch.nonzero(full["prepared"].image_mask).flatten().tolist()
    per_frame = len(visual) // len(pts)
    frame_of = {position: i // per_frame for i, position in enumerate(visual)}
    kept = [p for p in got["prepared"].position_ids.flatten().tolist() if p in frame_of]
    in_speech = [p for p in kept if int((pts[frame_of[p]] - pts[0]) // 2e9) in speech_windows]
    return len(in_speech) / max(1, len(kept))


def memory_prefix(backend: TransformersBackend, rounds: int = 5) -> dict[str, float]:
    """Prefill of a one-frame request (one 512 px tile) after a full memory: prefix K/V
    reused vs computed."""
    from stream_rt.memory import StreamingMemory

    frames, _ = clip_frames([2.0 + 4.0 * i for i in range(17)])
    memory = StreamingMemory(max_entries=16, anchors=2, tokens=16)
    for i, frame in enumerate(frames[:16]):
        gen = backend.generate([frame], "What happens?", max_new_tokens=1, summary_tokens=16)
        assert gen.summary is not None
        memory.add("walkway", int(i * 4e9), int(i * 4e9 + 1e9), gen.summary,
                   f"Two people walk along the walkway towards the camera ({i}).")  # fmt: skip
    entries = SourceMemory("walkway", tuple(memory.entries("walkway")))
    reused, computed, plain, diffs = [], [], [], []
    for _ in range(rounds):
        backend.memory_prefix.clear()
        fresh = backend.generate([frames[16]], "What happens?", max_new_tokens=1, memory=entries)
        again = backend.generate([frames[16]], "What happens?", max_new_tokens=1, memory=entries)
        none = backend.generate([frames[16]], "What happens?", max_new_tokens=1)
        computed.append(fresh.prefill_s)
        reused.append(again.prefill_s)
        plain.append(none.prefill_s)
        assert fresh.first_logits is not None and again.first_logits is not None
        diffs.append(float((fresh.first_logits - again.first_logits).abs().max()))
    return {
        "memory_prefix_tokens": fresh.memory_tokens,
        "prompt_tokens": fresh.prompt_tokens,
        "prefill_prefix_computed_s": round(statistics.median(computed), 3),
        "prefill_prefix_reused_s": round(statistics.median(reused), 3),
        "prefill_no_memory_s": round(statistics.median(plain), 3),
        "reuse_speedup": round(statistics.median(c / r for c, r in zip(computed, reused, strict=True)), 2),
        "max_logit_difference": float(f"{max(diffs):.3g}"),
    }


def long_replay_child(frames: int, series: Path) -> None:
    """The long replay (run in its own process, so its RSS is its own)."""
    from stream_rt.config import LOSSLESS_CHANNELS, parse_config
    from stream_rt.pipeline import build_pipeline

    url = f"synthetic:?frames={frames}&fps=10&width=64&height=48&active_s=6&period_s=60"
    config = parse_config({
        "sources": [{"id": "cam", "url": url}],
        "graph": LOSSLESS_CHANNELS,
        "mllm": {"reuse_threshold": 0, "flow": "latest", "clip": {"frames": 4, "interval_s": 1.0},
                 "memory": {"enabled": True, "max_entries": 8, "anchors": 2, "tokens": 8}},
    })  # fmt: skip
    pipeline = build_pipeline(config, speed=None)
    stage, source = pipeline.mllm, pipeline.sources[0]
    assert stage is not None and stage.memory is not None
    memory = stage.memory
    samples: list[tuple[float, int, float, int, int, int]] = []

    async def sample(started: float) -> None:
        while True:
            entries = memory.entries("cam")
            calls = pipeline.graph.statistics()["nodes"]["mllm"].get("model_calls", 0)
            samples.append((round(time.perf_counter() - started, 1), source.emitted, round(rss_mb(), 1),  # type: ignore[attr-defined]
                            len(entries), sum(e.visual.shape[0] for e in entries), calls))  # fmt: skip
            await asyncio.sleep(2.0)

    async def run() -> float:
        started = time.perf_counter()
        sampler = asyncio.create_task(sample(started))
        await pipeline.graph.run()
        sampler.cancel()
        return time.perf_counter() - started

    wall = asyncio.run(run())
    series.parent.mkdir(parents=True, exist_ok=True)
    with series.open("w") as out:
        out.write("wall_s,frames,rss_mb,memory_entries,memory_visual_tokens,model_calls\n")
        out.writelines(",".join(map(str, row)) + "\n" for row in samples)
    counters = pipeline.graph.statistics()["nodes"]["mllm"]
    print(json.dumps({
        "frames": source.emitted, "wall_s": round(wall, 1), "fps": round(source.emitted / wall),  # type: ignore[attr-defined]
        "model_calls": counters.get("model_calls", 0), "memory_merges": counters.get("memory_merges", 0),
        "memory_entries_max": max(s[3] for s in samples), "memory_visual_tokens_max": max(s[4] for s in samples),
        "token_budget": memory.token_budget, **rss_growth([s[2] for s in samples]),
    }))  # fmt: skip


def long_replay(frames: int) -> dict[str, Any]:
    series = Path(__file__).parent / "series" / "long_replay.csv"
    child = [sys.executable, __file__, "--long-replay-child", str(frames), "--series", str(series)]
    done = subprocess.run(child, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the long replay failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--fps", type=float, default=2.0, help="frames per second of each 8 s request")
    parser.add_argument("--replay-frames", type=int, default=1_000_000, help="long replay length (0: skip it)")
    parser.add_argument("--long-replay-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--series", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.long_replay_child:
        long_replay_child(args.long_replay_child, args.series)
        return
    labels = json.loads(CLIP.with_suffix(".json").read_text())["speech"]
    audio = audio_features(CLIP)
    backend = TransformersBackend(str(build_smoke_model(family="idefics3", size="realistic")), contract_stop=False)
    backend.load()
    assert backend.family is not None
    one_tile_per_frame(backend)  # clips use SmolVLM's smallest image setting
    rows = []
    for label in labels[: args.requests]:
        start = max(0.0, label["start_s"] - 4.0)
        count = round(8 * args.fps)
        images, pts = clip_frames([start + i / args.fps for i in range(count)])
        spans = [(s["start_s"], s["end_s"]) for s in labels]
        speech_windows = {w for w in range(4) if any(a < start + 2 * (w + 1) and b > start + 2 * w for a, b in spans)}
        full = one(backend, images, pts, audio, None)
        row: dict[str, Any] = {"speech_start_s": label["start_s"], "visual_full": full["visual"]}
        for mode in ("audio", "uniform"):
            compression = Compression(average=0.4, mode=mode)  # type: ignore[arg-type]
            got = one(backend, images, pts, audio, compression)
            with torch.inference_mode():
                tokens = [int(full["first"].argmax()), *full["ids"]][:NEW_TOKENS]
                top1, kl = answer_fidelity((backend, full["prepared"], full["first"], full["cache"]),
                                           (backend, got["prepared"], got["first"], got["cache"]), tokens)  # fmt: skip
            row[mode] = {
                "kept": round(got["visual"] / full["visual"], 3),
                "prefill_speedup": round(full["prefill_s"] / got["prefill_s"], 2),
                "end_to_end_speedup": round(full["total_s"] / got["total_s"], 2),
                "top1": round(top1, 3),
                "kl": float(f"{kl:.3g}"),
                "kept_in_speech_windows": round(speech_share(full, got, pts, speech_windows), 3),
            }
        in_speech = sum(1 for t in pts if int((t - pts[0]) // 2e9) in speech_windows)
        row["frames_in_speech_windows"] = round(in_speech / len(pts), 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    summary = {
        mode: {
            key: round(statistics.median(r[mode][key] for r in rows), 3)
            for key in ("kept", "prefill_speedup", "end_to_end_speedup", "top1", "kl", "kept_in_speech_windows")
        }
        for mode in ("audio", "uniform")
    }
    summary["frames_in_speech_windows"] = round(statistics.median(r["frames_in_speech_windows"] for r in rows), 3)
    prefix = memory_prefix(backend)
    print(json.dumps({"memory_prefix": prefix}), flush=True)
    replay = long_replay(args.replay_frames) if args.replay_frames else {}
    if replay:
        print(json.dumps({"long_replay": replay}), flush=True)
    print(json.dumps({"compression": summary, "requests": len(rows), "memory_prefix": prefix, "long_replay": replay}))


if __name__ == "__main__":
    main()

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

Usage: python benchmarks/compress_memory.py [--requests 5]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from common import answer_fidelity, copy_cache

from stream_rt import AudioFeatures, AvSource, CallbackSink, Graph, Packet, ReplayClock
from stream_rt.mllm.compression import Compression
from stream_rt.mllm.prompt import chat_messages
from stream_rt.mllm.requests import resize
from stream_rt.mllm.smoke import build_smoke_model
from stream_rt.mllm.transformers_backend import TransformersBackend
from stream_rt.operators.audio import AudioAnalyzer

ROOT = Path(__file__).resolve().parent.parent
CLIP = ROOT / "samples" / "walkway_speech.mkv"
NEW_TOKENS = 16
QUESTION = "What is happening, and is anyone speaking?"


def audio_features() -> list[AudioFeatures]:
    got: list[Packet] = []
    graph = Graph(clock=ReplayClock(None))
    graph.add(AvSource("walkway", str(CLIP), video=False))
    graph.add(AudioAnalyzer("audio"))
    graph.add(CallbackSink("sink", got.append))
    graph.connect("walkway.audio", "audio.audio", policy="block", capacity=64)
    graph.connect("audio.features", "sink.in", policy="block", capacity=64)
    asyncio.run(graph.run())
    return [p for p in got if isinstance(p, AudioFeatures)]


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
            prepared, features = compression.apply(family, prepared, features, pts, audio)
        logits, cache = backend.prefill(prepared, features)
        t2 = time.perf_counter()
        kept_cache = copy_cache(backend, cache)
        ids, _, _ = backend.decode(prepared, logits, cache, None, None, NEW_TOKENS)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--fps", type=float, default=2.0, help="frames per second of each 8 s request")
    args = parser.parse_args()
    labels = json.loads(CLIP.with_suffix(".json").read_text())["speech"]
    audio = audio_features()
    backend = TransformersBackend(str(build_smoke_model(family="idefics3", size="realistic")), contract_stop=False)
    backend.load()
    assert backend.family is not None
    # One 512 px tile per frame (64 tokens): clips use SmolVLM's smallest image setting.
    image_processor = backend.family.processor.image_processor  # type: ignore[attr-defined]
    image_processor.do_image_splitting = False
    image_processor.size = {"longest_edge": 512}
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
    print(json.dumps({"compression": summary, "requests": len(rows)}))


if __name__ == "__main__":
    main()

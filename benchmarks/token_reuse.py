#!/usr/bin/env python3
"""Temporal token reuse: consecutive calls on one source, reuse vs full recompute.

On the realistic-size config (SmolVLM-256M shaped, random weights; see
benchmarks/mllm.py), consecutive calls on two real clips:

- static camera, polling: still_motion.mkv every 8 s over the whole clip (a robot asking
  about its view at a fixed rate; three of its eleven calls fall in motion);
- static camera, episode: still_motion.mkv every 1.5 s from 17 s (people walk in at
  20 s: the calls a camera daemon makes during an event), with both schedules;
- handheld camera: tree.avi every second from 2 s;
- film: Megamind.avi every second from 2 s (camera moves and cuts: the worst case).

Each call is made twice in the same run, alternating: by a backend with token reuse
(its cache warm from the previous call) and by a plain backend (full recompute). Per call:
end-to-end latency (vision encode + prefill + 16 decoded tokens), the share of visual
tokens reused and of tiles whose encoder output was reused, and fidelity against the full
recompute over the answer positions: the full call's 16 greedy tokens are fed to both
caches (teacher forcing) and the next-token distributions compared (top-1 agreement, mean
KL). The first call of each clip fills the cache: it is reported apart, left out of the
warm-call figures, and counted in ``speedup_with_first_call`` (the series as one episode).
Both reuse schedules are measured on the static clip: ``fixed`` and VLA-Cache's ``entropy``.

Usage: python benchmarks/token_reuse.py [--calls 6]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from common import answer_fidelity, copy_cache, kv_of

from stream_rt.config import TokenReuseConfig
from stream_rt.graph.packets import MllmRequest
from stream_rt.media.images import rgb_luma
from stream_rt.mllm.backends.transformers_backend import TransformersBackend
from stream_rt.mllm.prompt import chat_messages, request_text
from stream_rt.mllm.smoke import build_smoke_model
from stream_rt.mllm.techniques.token_reuse import TokenReuse

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
NEW_TOKENS = 16


def frames_at(clip: Path, seconds: list[float]) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if frame.time is not None and len(out) < len(seconds) and frame.time >= seconds[len(out)]:
                out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == len(seconds):
                break
    return out


def one_call(backend: TransformersBackend, frame: np.ndarray, text: str, reuse: TokenReuse | None,
             key: tuple[str, str]) -> dict[str, Any]:  # fmt: skip
    family, model = backend.family, backend.model
    assert family is not None
    with torch.inference_mode():
        started = time.perf_counter()
        prepared = family.prepare([frame], chat_messages(1, text), model)
        if reuse is None:
            t0 = time.perf_counter()
            features = family.encode(model, prepared)
            t1 = time.perf_counter()
            logits, cache = backend.prefill(prepared, features)
            encode_s, prefill_s = t1 - t0, time.perf_counter() - t1
        else:
            result, encode_s, prefill_s = reuse.encode_and_prefill(model, family, prepared, [rgb_luma(frame)], key,
                                                                   "episode-1", backend.embed)  # fmt: skip
            logits, cache = result.logits, backend.cache_of(result.keys, result.values)
        kept = copy_cache(backend, cache)
        t2 = time.perf_counter()
        ids, _, _ = backend.decode(prepared, logits, kv_of(cache), None, None, NEW_TOKENS)
        decode_s = time.perf_counter() - t2
        total = time.perf_counter() - started
    return {"prepared": prepared, "first": logits, "cache": kept, "ids": ids, "encode_s": encode_s,
            "prefill_s": prefill_s, "decode_s": decode_s, "total_s": total,
            "outcome": reuse.last if reuse is not None else None}  # fmt: skip


def run_clip(model_path: Path, clip: Path, seconds: list[float], schedule: str) -> dict[str, Any]:
    text = request_text(MllmRequest("cam", 0, 0, 0, "cam-1", "What is happening in this scene?", (), ""))
    full = TransformersBackend(str(model_path), contract_stop=False)
    reusing = TransformersBackend(str(model_path), contract_stop=False)
    full.load()
    reusing.load()
    reuse = TokenReuse(TokenReuseConfig(schedule=schedule))
    frames = frames_at(clip, seconds)
    rows = []
    for i, frame in enumerate(frames):
        got = one_call(reusing, frame, text, reuse, ("cam", text))
        ref = one_call(full, frame, text, None, ("cam", text))
        with torch.inference_mode():
            tokens = [int(ref["first"].argmax()), *ref["ids"]][:NEW_TOKENS]
            top1, kl = answer_fidelity((full, ref["prepared"], ref["first"], ref["cache"]),
                                       (reusing, got["prepared"], got["first"], got["cache"]), tokens)  # fmt: skip
        outcome = got["outcome"]
        rows.append({
            "call": i,
            "mode": outcome.mode,
            "visual_reused": round(outcome.reused_tokens / max(1, outcome.visual_tokens), 3),
            "tiles_reused": f"{outcome.tiles_reused}/{outcome.tiles}",
            "full_s": round(ref["total_s"], 3),
            "reuse_s": round(got["total_s"], 3),
            "reuse_split_s": [round(got[k], 3) for k in ("encode_s", "prefill_s", "decode_s")],
            "speedup": round(ref["total_s"] / got["total_s"], 2),
            "top1": round(top1, 3),
            "kl": kl,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    warm = rows[1:]
    return {
        "first_call_speedup": rows[0]["speedup"],
        # the whole series as one episode, the call that fills the cache included
        "speedup_with_first_call": round(sum(r["full_s"] for r in rows) / sum(r["reuse_s"] for r in rows), 2),
        "speedup_median": round(statistics.median(r["speedup"] for r in warm), 2),
        "speedup_total": round(sum(r["full_s"] for r in warm) / sum(r["reuse_s"] for r in warm), 2),
        "visual_reused_mean": round(statistics.mean(r["visual_reused"] for r in warm), 3),
        "top1_mean": round(statistics.mean(r["top1"] for r in warm), 3),
        "kl_mean": float(f"{statistics.mean(r['kl'] for r in warm):.3g}"),
        "calls": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--series", nargs="*", help="only these series (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_smoke_model(family="idefics3", size="realistic")
    polling = [4.0 + 8.0 * i for i in range(11)]  # a robot asking every 8 s over the whole clip
    motion = [17.0 + 1.5 * i for i in range(args.calls)]  # calls during an episode: people walk in at 20 s
    handheld = [2.0 + i for i in range(args.calls)]
    results: dict[str, Any] = {}
    for name, clip, seconds, schedule in (
        ("static_polling", SAMPLES / "still_motion.mkv", polling, "fixed"),
        ("static_episode_fixed", SAMPLES / "still_motion.mkv", motion, "fixed"),
        ("static_episode_entropy", SAMPLES / "still_motion.mkv", motion, "entropy"),
        ("handheld", SAMPLES / "tree.avi", handheld, "fixed"),
        ("film", SAMPLES / "Megamind.avi", handheld, "fixed"),
    ):
        if args.series and name not in args.series:
            continue
        print(f"{name} ...", flush=True)
        results[name] = run_clip(model, clip, seconds, schedule)
        summary = {k: v for k, v in results[name].items() if k != "calls"}
        print(json.dumps(summary), flush=True)
    print(json.dumps({name: {k: v for k, v in r.items() if k != "calls"} for name, r in results.items()}))


if __name__ == "__main__":
    main()

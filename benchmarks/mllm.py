#!/usr/bin/env python3
"""The MLLM stage: where a call's time goes, and what each early exit saves.

1. Latency split on the realistic-size config (SmolVLM-256M shaped: SigLIP-shaped vision
   encoder at 512 px tiles, 2x2 tiles + global view, a 30-layer 576-wide language model,
   ~230M parameters, random weights): vision encode, prefill and decode of real keyframes
   of the walkway clip (vtest.avi), ``--calls`` calls after a warm-up, fixed 16 new tokens.
2. Contract stop: decode tokens of the fitted tiny smoke model with and without the stop
   (its answer is a valid JSON object followed by a sentence, as chatty real models do),
   and the seconds that many tokens cost on the realistic model.
3. Answer reuse: model calls on real clips (the walkway clip and the static-camera clip)
   through the whole pipeline, with reuse off and at thresholds 0.02 (the default), 0.05
   and 0.10 of the scene changed, same run; updates every 2 s so episodes ask repeatedly.
4. Layer exit: thresholds calibrated on logged calls (keyframes from the first half of the
   walkway clip) for a target depth, then evaluated on keyframes from the second half:
   average exit depth; top-1 agreement with the full-depth token at each position, judged
   on the full-depth prefix (teacher-forced, from a measuring run); the share of the
   full-depth greedy output reproduced exactly when decoding with the exits (tokens before
   the first difference); and decode time vs the plain loop. On the fitted tiny model and
   on the realistic model (random weights: its distances say little; listed for the cost
   of the exits).

Usage: python benchmarks/mllm.py [--calls 3]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

from stream_rt.config import LOSSLESS_CHANNELS, parse_config
from stream_rt.graph.packets import MllmRequest
from stream_rt.mllm.backends.transformers_backend import TransformersBackend
from stream_rt.mllm.prompt import request_text
from stream_rt.mllm.smoke import build_smoke_model
from stream_rt.mllm.techniques import Techniques
from stream_rt.mllm.techniques.layer_exit import LayerExit, calibrate, exit_cost, simulated_agreement
from stream_rt.pipeline import build_pipeline

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


def keyframes(clip: Path, indices: list[int]) -> list[np.ndarray]:
    out = []
    with av.open(str(clip)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in indices:
                out.append(frame.to_ndarray(format="rgb24"))
            if i >= max(indices):
                break
    return out


def prompt(question: str = "What is happening in this scene?") -> str:
    return request_text(MllmRequest("walkway", 0, 0, 0, "walkway-1", question, (), "Source 'walkway', at 12.0 s."))


def latency_split(backend: TransformersBackend, frames: list[np.ndarray]) -> dict[str, float]:
    backend.generate(frames[0:1], prompt(), max_new_tokens=4)  # warm-up
    rows = [backend.generate([f], prompt(), max_new_tokens=16) for f in frames]
    med = {k: statistics.median(getattr(g, k) for g in rows) for k in ("encode_s", "prefill_s", "decode_s")}
    total = sum(med.values())
    return {
        "encode_s": round(med["encode_s"], 3),
        "prefill_s": round(med["prefill_s"], 3),
        "decode_s_16_tokens": round(med["decode_s"], 3),
        "decode_s_per_token": round(med["decode_s"] / 16, 4),
        "share_encode": round(med["encode_s"] / total, 3),
        "visual_tokens": rows[0].visual_tokens,
        "prompt_tokens": rows[0].prompt_tokens,
    }


def contract_stop(tiny: TransformersBackend, frames: list[np.ndarray], per_token_s: float) -> dict[str, Any]:
    stopped, full = [], []
    for frame in frames:
        tiny.contract_stop = True
        stopped.append(len(tiny.generate([frame], prompt(), max_new_tokens=256).token_ids))
        tiny.contract_stop = False
        full.append(len(tiny.generate([frame], prompt(), max_new_tokens=256).token_ids))
    tiny.contract_stop = True
    saved = statistics.mean(f - s for s, f in zip(stopped, full, strict=True))
    return {
        "tokens_with_stop": statistics.mean(stopped),
        "tokens_without_stop": statistics.mean(full),
        "tokens_saved_per_call": saved,
        "share_saved": round(saved / statistics.mean(full), 3),
        "seconds_saved_per_call_realistic": round(saved * per_token_s, 2),
    }


async def reuse_calls(smoke: Path) -> dict[str, Any]:
    """Model calls with reuse off and at a few thresholds (share of the 16x16 grid changed)."""
    out: dict[str, Any] = {}
    for clip in ("vtest.avi", "still_motion.mkv"):
        row: dict[str, Any] = {}
        for threshold in (0.0, 0.02, 0.05, 0.10):
            with tempfile.TemporaryDirectory() as tmp:
                config = parse_config({
                    "sources": [{"id": "cam", "url": str(SAMPLES / clip), "audio": False}],
                    "graph": LOSSLESS_CHANNELS,
                    "trigger": {"update_interval_s": 2, "cooldown_s": 0, "max_calls_per_min": 60},
                    "mllm": {"model": str(smoke), "flow": "block", "reuse_threshold": threshold},
                    "sinks": {"jsonl": {"path": f"{tmp}/events.jsonl"}},
                })  # fmt: skip
                pipeline = build_pipeline(config, speed=None)
                await pipeline.graph.run()
                counters = pipeline.graph.statistics()["nodes"]["mllm"]
                row["requests"] = counters.get("requests", 0)
                row[f"calls_at_{threshold:g}"] = counters.get("model_calls", 0)
        for threshold in (0.02, 0.05, 0.10):
            row[f"saved_at_{threshold:g}"] = round(1 - row[f"calls_at_{threshold:g}"] / max(1, row["calls_at_0"]), 3)
        out[clip] = row
    return out


def layer_exit(model_path: Path, every: int, calibration: list[np.ndarray], held_out: list[np.ndarray],
               target_fraction: float, tokens: int) -> dict[str, Any]:  # fmt: skip
    """Calibrate on ``calibration`` frames, then evaluate on ``held_out`` frames."""
    calibration_log = LayerExit(every=every, thresholds=None)
    logging = Techniques(layer_exit=calibration_log)
    logger = TransformersBackend(str(model_path), contract_stop=False, techniques=logging)
    for frame in calibration:
        logger.generate([frame], prompt(), max_new_tokens=tokens)
    n_layers = len(logger.model.get_decoder().layers)
    thresholds = calibrate(calibration_log, n_layers, target_fraction * n_layers, exit_cost(logger.model))
    held_out_log = LayerExit(every=every, thresholds=None)
    full = TransformersBackend(str(model_path), contract_stop=False, techniques=Techniques(layer_exit=held_out_log))
    exiting = LayerExit(every=every, thresholds=thresholds)
    early = TransformersBackend(str(model_path), contract_stop=False, techniques=Techniques(layer_exit=exiting))
    plain = TransformersBackend(str(model_path), contract_stop=False)
    agree, total, full_s, early_s = 0, 0, 0.0, 0.0
    for frame in held_out:
        reference = full.generate([frame], prompt(), max_new_tokens=tokens)
        got = early.generate([frame], prompt(), max_new_tokens=tokens)
        full_s += plain.generate([frame], prompt(), max_new_tokens=tokens).decode_s
        early_s += got.decode_s
        pairs = zip(reference.token_ids, got.token_ids, strict=False)
        agree += next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(reference.token_ids),
                                                                           len(got.token_ids)))  # fmt: skip
        total += len(reference.token_ids)
    simulated_depth, top1 = simulated_agreement(held_out_log, n_layers, thresholds)
    return {
        "layers": n_layers,
        "exit_every": every,
        "target_depth": round(target_fraction * n_layers, 1),
        "mean_depth": round(exiting.mean_depth, 2),
        "top1_agreement_teacher_forced": round(top1, 3),
        "teacher_forced_mean_depth": round(simulated_depth, 2),
        "output_reproduced_share": round(agree / max(1, total), 3),
        "decode_speedup": round(full_s / max(early_s, 1e-9), 2),
        "thresholds": [round(t, 5) for t in thresholds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--parts", default="1234", help="which parts to run (default all: 1234)")
    args = parser.parse_args()
    torch.manual_seed(0)
    clip = SAMPLES / "vtest.avi"
    frames = keyframes(clip, [100, 300, 500, 700][: max(1, args.calls)])
    realistic_path = build_smoke_model(family="idefics3", size="realistic")
    tiny_path = build_smoke_model()
    results: dict[str, Any] = {}
    if "1" in args.parts:
        print("1. latency split (realistic config, random weights) ...", flush=True)
        results["latency_split"] = latency_split(TransformersBackend(str(realistic_path), contract_stop=False), frames)
        print(json.dumps(results["latency_split"]), flush=True)
    if "2" in args.parts:
        print("2. contract stop ...", flush=True)
        per_token = results.get("latency_split", {}).get("decode_s_per_token", float("nan"))
        results["contract_stop"] = contract_stop(TransformersBackend(str(tiny_path)), frames, per_token)
        print(json.dumps(results["contract_stop"]), flush=True)
    if "3" in args.parts:
        print("3. answer reuse on real clips ...", flush=True)
        results["answer_reuse"] = asyncio.run(reuse_calls(tiny_path))
        print(json.dumps(results["answer_reuse"]), flush=True)
    if "4" in args.parts:
        print("4. layer exit ...", flush=True)
        first_half, second_half = keyframes(clip, [50, 150, 250, 350]), keyframes(clip, [450, 550, 650, 750])
        results["layer_exit"] = {
            "tiny_fitted": layer_exit(tiny_path, 1, first_half, second_half, 0.75, 96),
            "realistic_random": layer_exit(realistic_path, 6, first_half[:2], second_half[:2], 0.6, 16),
        }
        print(json.dumps(results["layer_exit"]), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

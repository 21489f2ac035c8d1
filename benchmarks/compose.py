#!/usr/bin/env python3
"""Every technique together: token reuse, clips with audio-guided compression and the
memory prefix, in every combination, per episode, against full computation and against
the generic path (transformers' own ``generate``) on the same model.

Models (random weights: the figures are costs and agreement with the full computation,
not answer quality): by default the SmolVLM-256M-shaped smoke model (``--family``), each
frame one 512 px tile (SmolVLM's smallest image setting, as for video: 64 visual tokens);
with ``--model-type qwen3_vl`` or ``gemma3`` the realistic random-weight models of
:mod:`stream_rt.mllm.tiny_models` (Qwen3-VL-2B's 28 layers and vocabulary, narrower, with 3
DeepStack levels: 192 visual tokens a 4:3 frame; Gemma 3 270M's decoder with a SigLIP-B
tower at 448 px: 256 tokens an image). Each request is what the daemon sends during an
episode: a clip of ``--frames`` frames every 0.5 s ending at the call (with the clip's
real audio features where the file has sound), after a memory of ``--memory`` entries
(each the pooled visual tokens of an earlier keyframe and a line of text), and a
16-token answer. An episode is ``--calls`` calls ``--spacing`` s apart (1 s by default:
consecutive clips share frames, as a robot polling or a watch re-checking gives; the
daemon's own updates come every ``update_interval_s``, 10 s by default) under one event
id; token reuse starts cold at each episode (a new episode resets it) and the memory has
one more entry than in the episode before (which left one: the memory prefix's K/V keep
the entries the two share), so **the call that fills the caches is counted in the
episode's time**.

- ``full``: the same request computed whole every call by the adapter (the clip
  uncompressed, the memory prefix recomputed, nothing reused).
- ``generic``: the same model on the generic path — its processor and transformers'
  ``generate`` — as a model without an adapter runs: the clip uncompressed, the memory as
  text lines (its pooled visual tokens cannot go in), nothing kept between calls.
- each combination of ``reuse`` (temporal token reuse with tile reuse: the images or
  SmolVLM tiles a cached call saw), ``compress`` (OmniZip-style, 40 % of visual tokens
  kept on average) and ``prefix`` (the memory prefix's K/V kept for the entries a call
  shares with the one before).
- ``all+exit``: all three and the layer exit, its thresholds calibrated on a measuring run
  of other calls for 75 % of the layers, with each exit's cost (the output layer over the
  vocabulary) counted: where the exits would cost more than they skip, none is evaluated.
- ``recent``: the recent-frames baseline (SimpleStream, 2026): only the last ``--frames``
  frames, no memory, no compression, nothing reused — what a user gives up the memory for;
  ``recent-generic`` is the same request on the generic path, so ``recent`` against it is
  the adapter's full computation against transformers' ``generate`` on identical inputs.

Clips: the static camera (``still_motion.mkv``: still stretches, then people walk in;
episodes from 8 s and from 19 s, the second one with motion) and a film with cuts
(``Megamind.avi``, episodes from 2 s and 6 s). Every system runs each episode in the same
run, one after another (each call in another order, so that no system is always first),
on one shared model. Fidelity is per call against ``full``'s
call: top-1 agreement and KL of the first answer token's distribution, and the share of
the 16 greedy tokens reproduced before the first difference.

Usage: python benchmarks/compose.py [--model-type qwen3_vl] [--systems generic ...]
       [--calls 3] [--frames 4] [--memory 8]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from common import audio_features, one_tile_per_frame

from stream_rt.graph.packets import AudioFeatures, MllmRequest
from stream_rt.memory.streaming import MemoryEntry
from stream_rt.mllm.backends.call import ClipTiming, ReuseKey, SourceMemory
from stream_rt.mllm.backends.decoding import Generation
from stream_rt.mllm.backends.transformers_backend import TransformersBackend
from stream_rt.mllm.models.families import Family
from stream_rt.mllm.prompt import request_text
from stream_rt.mllm.smoke import build_smoke_model
from stream_rt.mllm.techniques import Techniques
from stream_rt.mllm.techniques.compression import Compression
from stream_rt.mllm.techniques.layer_exit import LayerExit, calibrate, exit_cost
from stream_rt.mllm.techniques.token_reuse import TokenReuse
from stream_rt.mllm.tiny_models import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
NEW_TOKENS = 16
INTERVAL_S = 0.5
S = 1_000_000_000
CLIPS = {"static": ("still_motion.mkv", [8.0, 19.0]), "film": ("Megamind.avi", [2.0, 6.0])}


def decoded(path: Path) -> list[tuple[float, np.ndarray]]:
    """Every frame of ``path``: (media time, RGB)."""
    with av.open(str(path)) as container:
        return [(float(f.time), f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]


def at(frames: list[tuple[float, np.ndarray]], t: float) -> tuple[float, np.ndarray]:
    return next((f for f in frames if f[0] >= t - 1e-6), frames[-1])


def systems(with_exit: list[float]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"full": {}, "generic": {"generic": True}}
    for reuse, compress, prefix in itertools.product([False, True], repeat=3):
        if reuse or compress or prefix:
            name = "+".join(n for n, on in (("reuse", reuse), ("compress", compress), ("prefix", prefix)) if on)
            out[name] = {"reuse": reuse, "compress": compress, "prefix": prefix}
    out["all+exit"] = {"reuse": True, "compress": True, "prefix": True, "exit": with_exit}
    out["recent"] = {"memory": False}
    out["recent-generic"] = {"memory": False, "generic": True}
    return out


def backend_for(base: TransformersBackend, settings: dict[str, Any]) -> TransformersBackend:
    backend = TransformersBackend(
        base.model_ref, contract_stop=False, max_new_tokens=NEW_TOKENS, device=str(base.device), dtype=base.dtype,
        techniques=Techniques(
            token_reuse=TokenReuse() if settings.get("reuse") else None,
            compression=Compression(average=0.4) if settings.get("compress") else None,
            layer_exit=LayerExit(every=2, thresholds=settings["exit"]) if "exit" in settings else None,
        ),
    )  # fmt: skip
    backend.model, backend.family, backend.cache_kw, backend.smoke = base.model, base.family, base.cache_kw, True
    if settings.get("generic"):  # the same model through its processor and transformers' generate
        family = base.family
        assert family is not None
        backend.family = Family(family.path, family.config, family.processor)
    return backend


def memory_of(base: TransformersBackend, frames: list[tuple[float, np.ndarray]], count: int) -> tuple[MemoryEntry, ...]:
    """Entries as the stage makes them: keyframes' visual tokens pooled to 16, and a line."""
    entries = []
    step = max(1, len(frames) // (count + 1))
    for i in range(count):
        t, image = frames[i * step]
        gen = base.generate([image], "Describe the scene.", max_new_tokens=1, summary_tokens=16)
        assert gen.summary is not None
        entries.append(MemoryEntry("cam", int(t * S), int(t * S) + S // 2, gen.summary, f"moment {i}: people, a room"))
    return tuple(entries)


def call(
    backend: TransformersBackend, settings: dict[str, Any], clip: list[tuple[float, np.ndarray]],
    audio: list[AudioFeatures], memory: tuple[MemoryEntry, ...], text: str, event: str,
) -> tuple[Generation, float]:  # fmt: skip
    if not settings.get("prefix", False):
        backend.memory_prefix.clear()  # computed again, as by a backend that keeps nothing
    pts = [int(t * S) for t, _ in clip]
    span = [a for a in audio if pts[0] - INTERVAL_S * S <= a.pts_ns <= pts[-1]]
    started = time.perf_counter()
    gen = backend.generate(
        [image for _, image in clip], text, reuse=ReuseKey("cam", text, event) if settings.get("reuse") else None,
        clip=ClipTiming(pts, span) if backend.compression is not None else None,
        memory=SourceMemory("cam", memory) if settings.get("memory", True) else None,
    )  # fmt: skip
    return gen, time.perf_counter() - started


def split(gen: Generation) -> list[float]:
    return [gen.encode_s or 0.0, gen.prefill_s, gen.decode_s]


def mean_split(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Mean seconds of vision encoding, prefill and decoding per call."""
    return {"encode_prefill_decode_s": [round(statistics.mean(r["split"][i] for r in rows), 3) for i in range(3)]}


def fidelity(got: Generation, ref: Generation) -> dict[str, float]:
    assert got.first_logits is not None and ref.first_logits is not None
    p, q = ref.first_logits.log_softmax(-1), got.first_logits.log_softmax(-1)
    same = next((i for i, (a, b) in enumerate(zip(got.token_ids, ref.token_ids, strict=False)) if a != b),
                min(len(got.token_ids), len(ref.token_ids)))  # fmt: skip
    return {"top1": float(int(p.argmax()) == int(q.argmax())), "kl": float((p.exp() * (p - q)).sum()),
            "greedy_same": same / NEW_TOKENS}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3, help="calls per episode")
    parser.add_argument(
        "--spacing",
        type=float,
        default=1.0,
        help="seconds between an episode's calls (the daemon's update_interval_s is 10 by default)",
    )
    parser.add_argument("--clips", nargs="*", choices=list(CLIPS), help="only these clips (default: both)")
    parser.add_argument("--frames", type=int, default=4, help="frames per clip, 0.5 s apart")
    parser.add_argument("--memory", type=int, default=8, help="memory entries before the prompt")
    parser.add_argument("--family", default="idefics3", choices=["idefics3", "qwen2_vl"], help="a smoke model's")
    parser.add_argument(
        "--model-type",
        choices=["qwen3_vl", "gemma3"],
        help="instead: a random-weight model of this type (stream_rt.mllm.tiny_models)",
    )
    parser.add_argument("--size", default="realistic", choices=["tiny", "realistic", "2b"])
    parser.add_argument("--systems", nargs="*", help="only these systems ('full' is always run: the reference)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = (
        build_tiny_model(args.model_type, size=args.size)
        if args.model_type
        else build_smoke_model(family=args.family, size=args.size)
    )
    base = TransformersBackend(str(model), contract_stop=False, max_new_tokens=NEW_TOKENS, device=args.device,
                               dtype=args.dtype)  # fmt: skip
    base.load()
    assert base.family is not None
    if base.family.name == "idefics3":
        one_tile_per_frame(base)
    text = request_text(MllmRequest("cam", 0, 0, 0, "cam-1", "What is happening in this scene?", (), ""))
    n_layers = len(base.model.get_decoder().layers)
    results: dict[str, Any] = {
        "calls": args.calls, "spacing_s": args.spacing, "frames": args.frames, "memory_entries": args.memory,
        "family": args.model_type or args.family, "size": args.size, "device": args.device, "dtype": args.dtype,
        "parameters_m": round(sum(p.numel() for p in base.model.parameters()) / 1e6), "clips": {},
    }  # fmt: skip
    exit_thresholds: list[float] | None = None
    for clip_name, (file, starts) in CLIPS.items():
        if args.clips and clip_name not in args.clips:
            continue
        frames, audio = decoded(SAMPLES / file), audio_features(SAMPLES / file)
        memory = memory_of(base, frames, args.memory + len(starts) - 1)
        if exit_thresholds is None:  # calibrate the exits on calls that are not measured
            measuring = backend_for(base, {"exit": None})
            for t in (1.0, 4.0, 10.0):
                measuring.generate([at(frames, t)[1]], text)
            assert measuring.layer_exit is not None
            exit_thresholds = calibrate(measuring.layer_exit, n_layers, 0.75 * n_layers, exit_cost(base.model))
        chosen = {n: v for n, v in systems(exit_thresholds).items() if not args.systems or n in {"full", *args.systems}}
        backends = {name: backend_for(base, settings) for name, settings in chosen.items()}
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
        for e, start in enumerate(starts):
            event = f"cam-{clip_name}-{e}"
            seen = memory[: args.memory + e]  # each episode before left an entry
            for b in backends.values():  # a new episode: token reuse starts cold
                if b.token_reuse is not None:
                    b.token_reuse.reset()
            for c in range(args.calls):
                t = start + c * args.spacing
                clip = [at(frames, t - INTERVAL_S * (args.frames - 1 - k)) for k in range(args.frames)]
                names = list(chosen)
                turn = len(rows["full"]) % len(names)  # each system takes each place in the order in turn
                done = {name: call(backends[name], chosen[name], clip, audio, seen, text, event)
                        for name in names[turn:] + names[:turn]}  # fmt: skip
                ref = done["full"][0]
                for name, (gen, took) in done.items():
                    row = {"episode": e, "call": c, "s": took, "split": split(gen), "prompt_tokens": gen.prompt_tokens,
                           "reuse": gen.reuse.mode if gen.reuse is not None else None,
                           **fidelity(gen, ref)}  # fmt: skip
                    if gen.exit_depth is not None:
                        row["exit_depth"] = round(gen.exit_depth, 2)
                    rows[name].append(row)
                took_s = {n: round(r[-1]["s"], 3) for n, r in rows.items()}
                print(json.dumps({"clip": clip_name, "episode": e, "call": c, **took_s}), flush=True)
        episodes = len(starts)
        full_s = [sum(r["s"] for r in rows["full"] if r["episode"] == e) for e in range(episodes)]
        summary: dict[str, Any] = {"full": {"episode_s": [round(x, 2) for x in full_s], **mean_split(rows["full"])}}
        for name in chosen:
            if name == "full":
                continue
            own = [sum(r["s"] for r in rows[name] if r["episode"] == e) for e in range(episodes)]
            summary[name] = {
                "episode_s": [round(x, 2) for x in own],
                "speedup_per_episode": round(sum(full_s) / sum(own), 2),
                "top1": round(statistics.mean(r["top1"] for r in rows[name]), 3),
                "kl_mean": float(f"{statistics.mean(r['kl'] for r in rows[name]):.3g}"),
                "greedy_same": round(statistics.mean(r["greedy_same"] for r in rows[name]), 3),
                "calls_reusing": sum(1 for r in rows[name] if r["reuse"] == "reuse"),
                "prompt_tokens_mean": round(statistics.mean(r["prompt_tokens"] for r in rows[name])),
                **mean_split(rows[name]),
            }
            if name == "all+exit":
                summary[name]["exit_depth_mean"] = round(statistics.mean(r["exit_depth"] for r in rows[name]), 2)
        for baseline, name in (("generic", "generic"), ("recent-generic", "recent")):
            if baseline in rows and name in rows:  # against transformers' own generate on the same model
                base_s = sum(r["s"] for r in rows[baseline])
                against = {n: round(base_s / sum(r["s"] for r in rows[n]), 2) for n in rows if n != baseline}
                summary[baseline]["speedup_of_each_over_this"] = against
        results["clips"][clip_name] = summary
        print(json.dumps({clip_name: summary}), flush=True)
    results["layers"] = n_layers
    print(json.dumps(results))


if __name__ == "__main__":
    main()

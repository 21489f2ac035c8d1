#!/usr/bin/env python3
"""Events that follow media time, and a model that cannot stall perception, measured side
by side in one run.

1. **Per-stream demuxing**: replays of ``walkway_speech.mkv`` (interleaved) and
   ``walkway_speech_late.mkv`` (all audio stored after all video) through an AvSource
   (video and audio, as fast as possible, one demuxer per stream) against a bare PyAV
   loop decoding both streams of the interleaved file with one demuxer. Per round, each
   is timed once in alternating order; ratios are medians over rounds.
2. **Alignment**: the ``walkway_speech`` scenario (video on; the speech component's
   episodes) on the interleaved file, the late-muxed sample and copies whose audio is
   stored 1 s and 3 s after its video: each speech onset against its label.
3. **A stuck model**: ``vtest.avi`` at real-time pace with the gates, snapshots and the
   smoke model, for ``--seconds``, once with the model healthy and once hanging in every
   call (its thread sleeps 60 s, longer than ``timeout_s`` = 1 s, before generating):
   frames the change detector gated per second, their ratio, and the answers by status.

Usage: python benchmarks/events.py [--rounds 7] [--seconds 20]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import av
import uvloop

from stream_rt import AvSource, CallbackSink, Graph, ReplayClock
from stream_rt.config import parse_config
from stream_rt.evaluation import episodes_of, load_scenario, run_scenario
from stream_rt.mllm.smoke import build_smoke_model
from stream_rt.pipeline import build_pipeline
from stream_rt.testing import remux_audio_late

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


def bare_both_streams(clip: Path) -> float:
    """Seconds of a PyAV loop decoding every video and audio packet with one demuxer."""
    started = time.perf_counter()
    with av.open(str(clip)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        video.thread_type = "AUTO"
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16_000)
        for packet in container.demux(video, audio):
            for frame in packet.decode():
                if isinstance(frame, av.AudioFrame):
                    resampler.resample(frame)
    return time.perf_counter() - started


def source_replay(clip: Path) -> float:
    graph = Graph(clock=ReplayClock(speed=None))
    graph.add(AvSource("clip", str(clip)))
    graph.add(CallbackSink("null", lambda packet: None))
    graph.connect("clip.video", "null.in", capacity=4)
    graph.connect("clip.audio", "null.in", capacity=64)
    started = time.perf_counter()
    uvloop.run(graph.run())
    return time.perf_counter() - started


def demuxing(rounds: int) -> dict[str, Any]:
    interleaved, late = SAMPLES / "walkway_speech.mkv", SAMPLES / "walkway_speech_late.mkv"
    ratios: dict[str, list[float]] = {"interleaved": [], "late": []}
    for _ in range(rounds):
        bare = bare_both_streams(interleaved)
        ratios["interleaved"].append(bare / source_replay(interleaved))
        ratios["late"].append(bare / source_replay(late))
    return {f"source_vs_bare_{k}": round(statistics.median(v), 3) for k, v in ratios.items()} | {
        f"range_{k}": [round(min(v), 3), round(max(v), 3)] for k, v in ratios.items()
    }


def alignment() -> dict[str, Any]:
    scenario = load_scenario(ROOT / "scenarios" / "walkway_speech.toml")
    labels = [start for start, _ in scenario.intervals]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        media = {"interleaved": SAMPLES / "walkway_speech.mkv", "late": SAMPLES / "walkway_speech_late.mkv"}
        for late_s in (1.0, 3.0):
            media[f"late_{late_s:g}s"] = remux_audio_late(media["interleaved"], Path(tmp) / f"{late_s}.mkv", late_s)
        for name, path in media.items():
            events = uvloop.run(run_scenario(dataclasses.replace(scenario, media=path))).events
            starts = [start for start, _, _ in episodes_of(events)]
            errors = [s - label for s, label in zip(starts, labels, strict=False)]
            out[name] = {
                "episodes": len(starts), "onset_error_mean_s": round(statistics.mean(errors), 3),
                "onset_error_max_s": round(max(errors), 3), "starts": [round(s, 2) for s in starts],
            }  # fmt: skip
    out["identical"] = all(v["starts"] == out["interleaved"]["starts"] for v in out.values() if isinstance(v, dict))
    return out


async def gated_rate(seconds: float, hang: bool) -> tuple[float, Counter[str]]:
    config = parse_config({
        "sources": [{"id": "walkway", "url": str(SAMPLES / "vtest.avi"), "audio": False}],
        "trigger": {"update_interval_s": 1, "cooldown_s": 1, "max_calls_per_min": 600, "snapshot": True},
        "mllm": {"model": str(build_smoke_model()), "reuse_threshold": 0, "timeout_s": 1},
    })  # fmt: skip
    pipeline = build_pipeline(config, speed=1.0)
    stage = pipeline.mllm
    assert stage is not None
    answers: Counter[str] = Counter()
    pipeline.graph.add(CallbackSink("answers", lambda a: answers.update([a.status])))  # type: ignore[attr-defined]
    pipeline.graph.connect("mllm.answers", "answers.in", capacity=64)
    if hang:
        generate = stage.backend.generate  # type: ignore[attr-defined]

        def hang_then_generate(*args: Any, **kwargs: Any) -> Any:
            time.sleep(60)
            return generate(*args, **kwargs)

        stage.backend.generate = hang_then_generate  # type: ignore[attr-defined]
    run = asyncio.create_task(pipeline.graph.run())
    nodes = lambda: pipeline.graph.statistics()["nodes"]  # noqa: E731
    while not nodes()["walkway"].get("frames"):
        await asyncio.sleep(0.05)
    started, first = time.monotonic(), nodes()["change"].get("processed", 0)
    await asyncio.sleep(seconds)
    rate = (nodes()["change"].get("processed", 0) - first) / (time.monotonic() - started)
    pipeline.graph.stop()
    await run
    return rate, answers


def stuck_model(seconds: float) -> dict[str, Any]:
    healthy, healthy_answers = uvloop.run(gated_rate(seconds, hang=False))
    stuck, stuck_answers = uvloop.run(gated_rate(seconds, hang=True))
    return {
        "gated_fps_healthy": round(healthy, 2), "gated_fps_stuck": round(stuck, 2),
        "stuck_vs_healthy": round(stuck / healthy, 3),
        "answers_healthy": dict(healthy_answers), "answers_stuck": dict(stuck_answers),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    if not (SAMPLES / "walkway_speech_late.mkv").exists():
        sys.exit("samples are missing: run 'python scripts/fetch_samples.py' first")
    results = {"demuxing": demuxing(args.rounds), "alignment": alignment(), "stuck_model": stuck_model(args.seconds)}
    for section, figures in results.items():
        print(f"{section}: {json.dumps(figures)}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Ingest overhead: the graph (PyAV source -> null sink, as fast as possible) against a
bare PyAV decode loop of the same real clip, measured side by side in one run.

Each round times ``--passes`` back-to-back replays of each, in alternating order, and
takes their ratio; the figures are medians over rounds, so that machine noise, which hits
adjacent measurements alike, cancels out. Target: graph_fps / bare_fps >= 0.9.

Usage: python benchmarks/ingest.py [--clip samples/vtest.avi] [--rounds 11] [--passes 3]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import uvloop
from common import bare_decode

from stream_rt import AvSource, CallbackSink, Graph, ReplayClock

ROOT = Path(__file__).resolve().parent.parent


def graph_replay(clip: Path) -> tuple[int, float]:
    graph = Graph(clock=ReplayClock(speed=None))
    graph.add(AvSource("clip", str(clip), audio=False))
    sink = CallbackSink("null", lambda packet: None)
    graph.add(sink)
    graph.connect("clip.video", "null.in", policy="block", capacity=4)  # as `stream-rt replay`
    started = time.perf_counter()
    uvloop.run(graph.run())
    elapsed = time.perf_counter() - started
    dropped = sum(e["dropped_total"] for e in graph.statistics()["edges"].values())
    assert dropped == 0, "the benchmark graph must not drop frames"
    return sink.received, elapsed


def timed(run: Callable[[Path], tuple[int, float]], clip: Path, passes: int) -> tuple[int, float]:
    frames = seconds = 0.0
    for _ in range(passes):
        n, t = run(clip)
        frames, seconds = frames + n, seconds + t
    return int(frames), frames / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=ROOT / "samples" / "vtest.avi")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    if not args.clip.exists():
        sys.exit(f"{args.clip} is missing: run 'python scripts/fetch_samples.py' first")

    frames, _ = bare_decode(args.clip)  # warm the file cache and the codec
    graph_replay(args.clip)
    bare_fps, graph_fps, ratios = [], [], []
    for round_ in range(args.rounds):
        order = [bare_decode, graph_replay] if round_ % 2 == 0 else [graph_replay, bare_decode]
        results = {run: timed(run, args.clip, args.passes) for run in order}
        (n_bare, bare), (n_graph, ours) = results[bare_decode], results[graph_replay]
        assert n_graph == n_bare, f"graph delivered {n_graph} frames, decode gave {n_bare}"
        bare_fps.append(bare)
        graph_fps.append(ours)
        ratios.append(ours / bare)

    result = {
        "clip": args.clip.name,
        "frames": frames,
        "rounds": args.rounds,
        "passes": args.passes,
        "bare_fps": round(statistics.median(bare_fps), 1),
        "graph_fps": round(statistics.median(graph_fps), 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
    }
    print(f"bare PyAV decode : {result['bare_fps']:8.1f} fps (median of {args.rounds} rounds)")
    print(f"stream_rt graph  : {result['graph_fps']:8.1f} fps (source -> null sink)")
    print(
        f"ratio            : {result['ratio']:8.3f} (median of per-round ratios; "
        f"range {result['ratio_min']}..{result['ratio_max']}; target >= 0.9)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

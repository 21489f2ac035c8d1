#!/usr/bin/env python3
"""Soak: a long replay with every stage on, sampling what leaks when something leaks.

A synthetic source (``--hours`` of media at 10 fps, 160x120, with sound; the square moves
and the tone sounds 6 s of every 60 s) through the whole pipeline as fast as it goes:
change detection, audio features with the VAD, salience, the trigger, the MLLM stage on
the smoke model (clips of 4 frames with audio-guided compression, a 16-entry memory,
flow "latest"), the JSONL sink, the MQTT sink through a real mosquitto on a loopback port
(durable outbox) and the /metrics and /healthz endpoints, scraped at every sample.

Every second: RSS, open file descriptors, threads, the deepest and the total channel
queue depth, the outbox depth, memory entries, model calls, events. The series goes to
``benchmarks/series/soak.csv`` and a plot to ``benchmarks/series/soak.svg``. "Flat" is
judged after the warm-up (the first fifth): RSS growth is the median of the last tenth
over the median of the tenth after the warm-up; descriptors and threads must not end
higher than they were after the warm-up. Every event the JSONL log holds must reach a
subscriber on the broker (counted by event id).

Usage: python benchmarks/soak.py [--hours 2]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from common import rss_growth, rss_mb

from stream_rt.config import LOSSLESS_CHANNELS, parse_config
from stream_rt.ops.http import OpsServer
from stream_rt.pipeline import build_pipeline
from stream_rt.testing import Broker, Subscriber, free_port

COLUMNS = ["wall_s", "frames", "rss_mb", "fds", "threads", "queue_max", "queue_total", "outbox_depth",
           "memory_entries", "model_calls", "events"]  # fmt: skip


def os_threads() -> int:
    """Threads of this process as the kernel counts them (torch's and FFmpeg's included)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


async def scrape(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    await reader.read()
    writer.close()
    await writer.wait_closed()
    return status


async def soak(hours: float, workdir: Path) -> tuple[list[list[float]], dict[str, Any]]:
    port = free_port()
    broker = Broker(port, workdir)
    broker.start()
    subscriber = Subscriber(port)
    await asyncio.wait_for(subscriber.connected.wait(), 5)
    frames = int(hours * 3600 * 10)
    url = f"synthetic:?frames={frames}&fps=10&width=160&height=120&active_s=6&period_s=60"
    config = parse_config({
        "sources": [{"id": "soak", "url": url}],
        "graph": LOSSLESS_CHANNELS,
        "mllm": {"reuse_threshold": 0, "flow": "latest", "clip": {"frames": 4, "interval_s": 1.0},
                 "memory": {"enabled": True, "max_entries": 16, "tokens": 8,
                            "snapshot": str(workdir / "memory.npz"), "snapshot_interval_s": 10}},
        "sinks": {"jsonl": {"path": str(workdir / "events.jsonl")},
                  "mqtt": {"port": port, "outbox": str(workdir / "outbox.sqlite"), "stats_interval_s": 5}},
    })  # fmt: skip
    pipeline = build_pipeline(config, speed=None)
    graph, source, stage = pipeline.graph, pipeline.sources[0], pipeline.mllm
    assert stage is not None and stage.memory is not None
    ops = OpsServer(graph.statistics, pipeline.sources, graph.clock, port=0)
    await ops.start()
    rows: list[list[float]] = []
    bad_scrapes = 0

    async def sample(started: float) -> None:
        nonlocal bad_scrapes
        while True:
            stats = graph.statistics()
            depths = [edge["depth"] for edge in stats["edges"].values()]
            mllm, mqtt = stats["nodes"].get("mllm", {}), stats["nodes"].get("mqtt", {})
            if await scrape(ops.port, "/metrics") != 200:
                bad_scrapes += 1
            await scrape(ops.port, "/healthz")
            rows.append([
                round(time.perf_counter() - started, 1), getattr(source, "emitted", 0), round(rss_mb(), 1),
                len(os.listdir("/proc/self/fd")), os_threads(), max(depths, default=0), sum(depths),
                mqtt.get("outbox_depth", 0), len(stage.memory.entries("soak")), mllm.get("model_calls", 0),
                sum(v for k, v in stats["nodes"].get("trigger", {}).items() if k.startswith("events_")),
            ])  # fmt: skip
            await asyncio.sleep(1.0)

    started = time.perf_counter()
    sampler = asyncio.create_task(sample(started))
    try:
        await graph.run()
    finally:
        sampler.cancel()
        await ops.stop()
    wall = time.perf_counter() - started
    logged = {r["event_id"] + ":" + str(r["seq"]) for r in map(json.loads, (workdir / "events.jsonl").open())
              if r["kind"] == "Event"}  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        received = {f"{e['event_id']}:{e['seq']}" for e in subscriber.payloads("/events")}
        if logged <= received:
            break
        await asyncio.sleep(0.2)
    await subscriber.close()
    broker.kill()
    counters = graph.statistics()["nodes"]
    return rows, {
        "media_hours": round(frames / 36000, 2), "frames": getattr(source, "emitted", 0), "wall_s": round(wall, 1),
        "events": len(logged), "events_lost": len(logged - received),
        "model_calls": counters["mllm"].get("model_calls", 0),
        "memory_merges": counters["mllm"].get("memory_merges", 0),
        "bad_metrics_scrapes": bad_scrapes,
    }  # fmt: skip


def judge(rows: list[list[float]]) -> dict[str, Any]:
    col = {name: [row[i] for row in rows] for i, name in enumerate(COLUMNS)}
    n = len(rows)
    warm = n // 5
    after = {name: values[warm:] for name, values in col.items()}
    return {
        "samples": n,
        **rss_growth(col["rss_mb"]),
        "fds_after_warmup": col["fds"][warm], "fds_max_after_warmup": max(after["fds"]), "fds_end": col["fds"][-1],
        "threads_after_warmup": col["threads"][warm], "threads_max_after_warmup": max(after["threads"]),
        "threads_end": col["threads"][-1],
        "queue_max": max(col["queue_max"]), "outbox_depth_max": max(col["outbox_depth"]),
        "memory_entries_max": max(col["memory_entries"]),
    }  # fmt: skip


def plot(rows: list[list[float]], path: Path) -> None:
    """One small panel per series, drawn as SVG polylines (no plotting library needed)."""
    names = ["rss_mb", "fds", "threads", "queue_total", "outbox_depth", "memory_entries"]
    width, height, pad = 640, 110, 40
    t = [row[0] for row in rows]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{len(names) * height + 20}" '
             'font-family="sans-serif" font-size="11">']  # fmt: skip
    for k, name in enumerate(names):
        values = [row[COLUMNS.index(name)] for row in rows]
        lo, hi = min(values), max(values)
        span, top = (hi - lo) or 1.0, k * height + 20
        points = " ".join(
            f"{pad + (x - t[0]) / max(t[-1] - t[0], 1e-9) * (width - 2 * pad):.1f},"
            f"{top + height - 25 - (v - lo) / span * (height - 40):.1f}"
            for x, v in zip(t, values, strict=True)
        )
        parts.append(f'<text x="{pad}" y="{top}">{name}: {lo:g} .. {hi:g} over {t[-1]:.0f} s</text>')
        parts.append(f'<rect x="{pad}" y="{top + 5}" width="{width - 2 * pad}" height="{height - 30}" fill="none" '
                     'stroke="#ccc"/>')  # fmt: skip
        parts.append(f'<polyline points="{points}" fill="none" stroke="#1f5fa8" stroke-width="1.2"/>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=2.0, help="hours of media (10 fps)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows, run = asyncio.run(soak(args.hours, Path(tmp)))
    out = Path(__file__).parent / "series"
    out.mkdir(exist_ok=True)
    with (out / "soak.csv").open("w") as csv:
        csv.write(",".join(COLUMNS) + "\n")
        csv.writelines(",".join(map(str, row)) + "\n" for row in rows)
    plot(rows, out / "soak.svg")
    result = {**run, **judge(rows)}
    print(f"{result['media_hours']} h of media ({result['frames']} frames) in {result['wall_s']} s; "
          f"{result['events']} events, {result['events_lost']} lost; RSS {result['rss_after_warmup_mb']} -> "
          f"{result['rss_end_mb']} MB ({100 * result['rss_growth']:+.2f} %); fds {result['fds_after_warmup']} -> "
          f"{result['fds_end']}; threads {result['threads_after_warmup']} -> {result['threads_end']}")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()

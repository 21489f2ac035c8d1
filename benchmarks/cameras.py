"""Many cameras, one model server: 1, 4 and 16 cameras (real clips) replayed at their own
pace through one daemon into one ``stream-rt worker`` (the smoke model, random weights),
with ``[mllm] max_in_flight`` 1 and 4.

Per run: answers per second, each camera's share of its model-calling events answered
``ok`` (``answered_share_min`` over the mean: fairness), p50/p95 event -> answer latency
(wall time, from the event to its answer record). Fairness is also given as each
camera's count of ``ok`` answers, min over mean: turns taken round-robin give cameras
equal counts, so a camera with more events has a smaller share of them answered. The
last line is one JSON object.

    python benchmarks/cameras.py [--seconds 30] [--cameras 1 4 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from stream_rt.config import parse_config
from stream_rt.pipeline import build_pipeline
from stream_rt.testing import free_port, start_worker

ROOT = Path(__file__).resolve().parents[1]


CLIPS = ["vtest.avi", "walkway_light.mkv", "still_motion.mkv", "walkway_speech.mkv"]  # each longer than a run


async def run(cameras: int, in_flight: int, seconds: float, port: int, samples: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "events.jsonl"
        config = parse_config({
            "sources": [{"id": f"cam{i:02d}", "url": str(samples / CLIPS[i % len(CLIPS)]), "audio": False}
                        for i in range(cameras)],
            "trigger": {"update_interval_s": 0.5, "cooldown_s": 0, "max_calls_per_min": 600},
            "mllm": {"backend": "openai", "url": f"http://127.0.0.1:{port}/v1", "model": "smoke",
                     "max_in_flight": in_flight, "reuse_threshold": 0, "timeout_s": 60},
            "sinks": {"jsonl": {"path": str(log)}},
        })  # fmt: skip
        pipeline = build_pipeline(config, speed=1.0)
        task = asyncio.create_task(pipeline.graph.run())
        started = time.monotonic()
        await asyncio.sleep(seconds)
        pipeline.graph.stop()
        await asyncio.wait_for(task, 120)
        elapsed = time.monotonic() - started
        records = [json.loads(line) for line in log.read_text().splitlines()]
    calling = [r for r in records if r["kind"] == "Event" and r.get("call_model")]
    answers = {(r["event_id"], r["seq"]): r for r in records if r["kind"] == "MllmAnswer"}
    shares, counts, latencies = [], [], []
    for source in sorted({r["source_id"] for r in calling}):
        mine = [e for e in calling if e["source_id"] == source]
        ok = [answers[k] for e in mine if (k := (e["event_id"], e["seq"])) in answers and answers[k]["status"] == "ok"]
        shares.append(len(ok) / len(mine))
        counts.append(len(ok))
    for e in calling:
        if (answer := answers.get((e["event_id"], e["seq"]))) is not None and answer["status"] == "ok":
            latencies.append((answer["wall_ns"] - e["wall_ns"]) / 1e9)
    latencies.sort()
    ok_total = sum(1 for a in answers.values() if a["status"] == "ok")
    mean = statistics.fmean(shares) if shares else 0.0
    return {
        "cameras": cameras, "max_in_flight": in_flight, "seconds": round(elapsed, 1),
        "calling_events": len(calling), "answered_ok": ok_total, "answers_per_s": round(ok_total / elapsed, 3),
        "answered_share_mean": round(mean, 3),
        "answered_share_min_over_mean": round(min(shares) / mean, 3) if shares and mean else 0.0,
        "answered_count_min_over_mean": round(min(counts) / statistics.fmean(counts), 3) if counts else 0.0,
        "latency_p50_s": round(latencies[len(latencies) // 2], 3) if latencies else None,
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
    }  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="wall time of each run")
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    samples = ROOT / "samples"
    port = free_port()
    worker = await start_worker("smoke", port, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout_s=120)
    results = []
    try:
        for cameras in args.cameras:
            for in_flight in (1, 4):
                result = await run(cameras, in_flight, args.seconds, port, samples)
                print(f"{cameras:3d} cameras, max_in_flight {in_flight}: {result['answers_per_s']:.2f} answers/s, "
                      f"fairness {result['answered_share_min_over_mean']:.2f}, p50 {result['latency_p50_s']} s, "
                      f"p95 {result['latency_p95_s']} s", flush=True)  # fmt: skip
                results.append(result)
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 30)
    by = {(r["cameras"], r["max_in_flight"]): r for r in results}
    ratios = {c: round(by[(c, 4)]["answers_per_s"] / by[(c, 1)]["answers_per_s"], 2)
              for c in args.cameras if by[(c, 1)]["answers_per_s"]}  # fmt: skip
    print(json.dumps({"runs": results, "answers_per_s_ratio_4_vs_1": ratios}))


if __name__ == "__main__":
    asyncio.run(main())

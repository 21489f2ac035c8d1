#!/usr/bin/env python3
"""Fault injection, repeated: runs the fault tests (real mosquitto, real ffmpeg camera on
loopback, real model worker process, real daemon processes) ``--rounds`` times and
reports for each fault how often it held, the events lost (each test fails on any loss
of an event the outbox took) and the recovery time the test recorded.

Usage: python benchmarks/faults.py [--rounds 3]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FAULTS = {
    "broker SIGKILLed during a burst of 1,500 events": "test_mqtt.py::test_broker_killed_mid_burst_loses_no_event",
    "daemon started while the broker is down":
        "test_mqtt.py::test_starting_while_the_broker_is_down_delivers_once_it_is_up",
    "live camera (ffmpeg on loopback) killed and restarted, twice":
        "test_live.py::test_source_reconnects_after_the_server_is_killed_and_restarted",
    "live camera stalls without closing": "test_live.py::test_a_stalled_stream_is_detected_by_the_watchdog",
    "MLLM backend raising and hanging":
        "test_mllm.py::test_a_failing_or_hanging_backend_is_reported_and_perception_keeps_running",
    "MLLM worker process SIGKILLed and restarted":
        "test_faults.py::test_a_crashed_model_worker_costs_answers_not_events_and_calls_resume_once_it_is_back",
    "outbox database full": "test_faults.py::test_events_go_on_reaching_the_broker_while_the_outbox_disk_is_full",
    "outbox file removed, then a restart":
        "test_faults.py::test_a_removed_outbox_file_is_written_anew_and_nothing_is_lost",
    "daemon SIGKILLed mid-run, restarted":
        "test_faults.py::test_a_daemon_stopped_mid_run_delivers_everything_its_outbox_took_after_a_restart[SIGKILL]",
    "daemon SIGTERMed mid-run, restarted":
        "test_faults.py::test_a_daemon_stopped_mid_run_delivers_everything_its_outbox_took_after_a_restart[SIGTERM]",
    "SIGTERM during a replay": "test_cli.py::test_sigterm_during_replay_loses_no_emitted_packet",
}  # fmt: skip


def one_round(report: Path) -> dict[str, dict[str, Any]]:
    tests = [f"tests/{node}" for node in FAULTS.values()]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *tests]
    subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    results = {}
    for case in ET.parse(report).iter("testcase"):
        node = f"{case.get('classname', '').rsplit('.', 1)[-1]}.py::{case.get('name')}"
        failed = case.find("failure") is not None or case.find("error") is not None
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        results[node] = {"passed": not failed, **properties}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    seen: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for node, result in one_round(Path(tmp) / f"round{k}.xml").items():
                seen[node].append(result)
            print(f"round {k + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    summary = {}
    for fault, node in FAULTS.items():
        runs = seen.get(node, [])
        recoveries = [float(r["recovery_s"]) for r in runs if "recovery_s" in r]
        detections = [float(r["detected_s"]) for r in runs if "detected_s" in r]
        lost = [int(r["lost"]) for r in runs if "lost" in r]
        summary[fault] = {
            "runs": len(runs),
            "held": sum(r["passed"] for r in runs),
            "lost": sum(lost) if lost else None,
            "recovery_s_max": max(recoveries) if recoveries else None,
            "detected_s_max": max(detections) if detections else None,
        }
        figures = ", ".join(
            f"{k} {v}" for k, v in summary[fault].items() if v is not None and k not in ("runs", "held")
        )
        print(f"{fault}: held {summary[fault]['held']} of {len(runs)}" + (f"; {figures}" if figures else ""))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

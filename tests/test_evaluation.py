"""The evaluation: its scoring on hand-made cases, and the gates on the project's real scenarios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stream_rt.evaluation import fixed_interval_baseline, score

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


def test_score_counts_hits_misses_false_alarms_and_latency() -> None:
    labels = [(10.0, 20.0), (40.0, 45.0), (70.0, 71.0)]
    episodes = [(10.3, 25.0), (39.5, 47.0), (55.0, 58.0)]  # third label missed; one false alarm
    result = score(episodes, calls=4, frames=800, intervals=labels, tol=1.0)
    assert result.recall == pytest.approx(2 / 3)
    assert result.precision == pytest.approx(2 / 3)
    assert result.latency_mean_s == pytest.approx((0.3 - 0.5) / 2)
    assert result.call_share == pytest.approx(4 / 800)


def test_fixed_interval_baseline_calls_every_second() -> None:
    result = fixed_interval_baseline(79.5, 795, [(8.25, 14.7), (24.5, 24.9)])
    assert result.calls == 80 and result.call_share == pytest.approx(80 / 795)
    assert result.recall == 0.5  # a 0.4 s label between two whole seconds is never seen
    assert result.latency_mean_s == pytest.approx(0.75)


def test_gates_meet_their_targets_on_the_real_scenarios(samples: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stream_rt.cli", "eval", *sorted(str(p) for p in SCENARIOS.glob("*.toml"))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout.splitlines()[-1])
    assert {r["scenario"] for r in reports} == {"still_motion", "walkway", "walkway_speech"}
    for report in reports:
        ours = report["stream_rt"]
        assert ours["recall"] >= 0.95 and ours["precision"] >= 0.8, report
        assert ours["latency_p95_s"] <= 0.3, report
        assert ours["call_share"] <= 0.05, report
        assert ours["call_share"] < report["baseline_1hz"]["call_share"]

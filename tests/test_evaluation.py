"""The evaluation: its scoring on hand-made cases, and the gates on the project's real scenarios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stream_rt.evaluation import adaptive_calls, fixed_interval_calls, score

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


def test_score_counts_hits_misses_false_alarms_and_latency() -> None:
    labels = [(10.0, 20.0), (40.0, 45.0), (70.0, 71.0)]
    episodes = [(10.3, 25.0), (39.5, 47.0), (55.0, 58.0)]  # third label missed; one false alarm
    result = score(episodes, calls=4, frames=800, intervals=labels, tol=1.0)
    assert result.recall == pytest.approx(2 / 3)
    assert result.precision == pytest.approx(2 / 3)
    assert result.latency_mean_s == pytest.approx(0.3 / 2), "opened 0.5 s before its label: seen at once, not sooner"
    assert result.call_share == pytest.approx(4 / 800)
    # Opened by something else 30 s before the label and running on into it: not for it.
    early = score([(20.0, 60.0)], calls=1, frames=800, intervals=[(50.0, 55.0)], tol=0.5,
                  non_events={"path": [(0.0, 49.5)]})  # fmt: skip
    assert early.precision == 0.0 and early.false_episodes == {"path": 1} and early.false_total == 1
    assert early.recall == 0.0, "its first call saw the path, not the label"
    both = score([(20.0, 21.0)], calls=1, frames=800, intervals=[(50.0, 55.0)], tol=0.5,
                 non_events={"light": [(19.0, 22.0)], "standing": [(10.0, 30.0)]})  # fmt: skip
    assert both.false_episodes == {"light": 1, "standing": 1} and both.false_total == 1, "one episode, two kinds"


def test_the_baselines_are_scored_by_the_same_rules() -> None:
    calls = fixed_interval_calls(79.5)
    assert calls[:3] == [0.0, 1.0, 2.0] and len(calls) == 80
    exact = score([(t, t) for t in calls], len(calls), 795, [(8.25, 14.7), (24.5, 24.9)], tol=0.0)
    assert exact.recall == 0.5 and exact.latency_mean_s == pytest.approx(0.75)  # 24.5-24.9 falls between calls
    tolerant = score([(t, t) for t in calls], len(calls), 795, [(8.25, 14.7), (24.5, 24.9)], tol=1.0,
                     non_events={"light": [(40.0, 45.0)]})  # fmt: skip
    assert tolerant.recall == 1.0 and tolerant.false_episodes == {"light": 6}
    # The calls at 8 s and 24 s come before their labels and see nothing: 9 s and 25 s do.
    assert tolerant.latency_mean_s == pytest.approx((0.75 + 0.5) / 2)
    speech = [(t / 10, 0.9 if 10 <= t / 10 < 14 else 0.0) for t in range(300)]
    assert adaptive_calls(30.0, speech)[:8] == pytest.approx([0.0, 10 / 3, 20 / 3, 10.0, 11.0, 12.0, 13.0, 14.0])


SLOW_ONSETS = {  # p95 onset at most (s), and why it is over 0.3 s
    "walkway": (1.0, "people walk from the first frame, and a source's first 8 frames only teach the detector"),
    "tree": (1.0, "2.3 frames a second: the episode is confirmed one frame (0.43 s) after the fingertips"),
    "pen": (1.0, "the pen's tip at the edge covers under 1 % of the frame; the pen itself comes 0.8 s later"),
    "lawn_detect": (1.2, "detect_fps = 1: the person on the grass is confirmed at the next detection"),
}


@pytest.mark.timeout(600)
def test_gates_meet_their_targets_on_the_real_scenarios(samples: Path) -> None:
    # The Frigate-style baseline's detector at 5 fps would triple the time; it is a figure of
    # benchmarks/RESULTS.md, not a target of stream_rt's.
    scenarios = sorted(str(p) for p in SCENARIOS.glob("*.toml"))
    result = subprocess.run(
        [sys.executable, "-m", "stream_rt.cli", "eval", "--no-frigate", *scenarios],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stderr
    reports = {r["scenario"]: r for r in json.loads(result.stdout.splitlines()[-1])}
    assert set(reports) == {p.stem for p in SCENARIOS.glob("*.toml")}
    for name, report in reports.items():
        ours = report["stream_rt"]
        assert ours["recall"] >= 0.95 and ours["precision"] >= 0.9, report
        assert ours["false_episodes"].get("light", 0) == 0, report
        limit, why = SLOW_ONSETS.get(name, (0.3, ""))
        assert ours["latency_p95_s"] <= limit, (why, report)
        assert ours["call_share"] <= 0.02, report
        assert ours["call_share"] < report["1 call/s"]["call_share"]
    assert 0 < reports["walkway"]["stream_rt"]["detector_share"] <= 0.10, "the detector on a busy scene"
    light = reports["walkway_light"]
    assert light["1 call/s"]["false_total"] > 0, "the non-events are there to be failed"


def without(scenario: str, tmp_path: Path, drop: str = "", add: str = "") -> dict:
    """The evaluation of ``scenario`` with a line of its file dropped or lines added."""
    text = (SCENARIOS / scenario).read_text().replace('"../samples/', f'"{SCENARIOS.parent}/samples/')
    variant = tmp_path / scenario
    variant.write_text("\n".join(line for line in text.splitlines() if not drop or not line.startswith(drop)) + add)
    result = subprocess.run([sys.executable, "-m", "stream_rt.cli", "eval", "--no-frigate", str(variant)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])[0]["stream_rt"]


@pytest.mark.timeout(300)
def test_the_scenarios_fail_without_the_gate_they_test(samples: Path, tmp_path: Path) -> None:
    no_light = without("walkway_light.toml", tmp_path, add="\n[pipeline.change]\nlight = false\n")
    assert no_light["false_episodes"]["light"] >= 5, "a pixel test alone takes light for activity"
    no_zone = without("lawn.toml", tmp_path, drop="require_zones")
    assert no_zone["false_episodes"]["path"] >= 1 and no_zone["precision"] < 0.9, "the path is not the lawn"


async def test_the_frigate_style_baseline_runs_its_detector_on_motion(samples: Path) -> None:
    from stream_rt.evaluation import evaluate

    report = await evaluate(SCENARIOS / "tree.toml")
    frigate, ours = report["frigate"], report["stream_rt"]
    assert frigate["detector_share"] > 0.5, "wind in the leaves is motion everywhere: it detects on most frames"
    assert ours["detector_share"] == 0 and frigate["frames"] == ours["frames"]


async def test_speech_episodes_follow_media_time_however_the_file_is_muxed(samples: Path, tmp_path: Path) -> None:
    """With the video on, the walkway's speech episodes open within 0.3 s of their labels,
    the same from the interleaved file, the late-muxed sample, and copies whose audio is
    stored 1 s and 3 s after its video."""
    import dataclasses

    from stream_rt.evaluation import episodes_of, load_scenario, run_scenario
    from stream_rt.testing.media import audio_lag_s, remux_audio_late

    scenario = load_scenario(SCENARIOS / "walkway_speech.toml")
    assert scenario.component == "speech" and "change" not in scenario.pipeline, "the video is on"
    media = {"interleaved": samples / "walkway_speech.mkv", "late": samples / "walkway_speech_late.mkv"}
    for late_s in (1.0, 3.0):
        media[f"{late_s:g} s late"] = remux_audio_late(
            samples / "walkway_speech.mkv", tmp_path / f"{late_s}.mkv", late_s
        )
        assert max(audio_lag_s(media[f"{late_s:g} s late"])) >= late_s - 0.1, "really stored late"
    starts = {}
    for name, path in media.items():
        run = await run_scenario(dataclasses.replace(scenario, media=path))
        starts[name] = [round(start, 3) for start, _, _ in episodes_of(run.events)]
        assert len(starts[name]) == len(scenario.intervals), (name, starts[name])
        for start, (label, _) in zip(starts[name], scenario.intervals, strict=True):
            assert -0.1 <= start - label <= 0.3, (name, start, label)
    assert all(s == starts["interleaved"] for s in starts.values()), starts

"""The replay report, rendered by a real headless Chromium: no console errors, every
thumbnail there, and the timeline shows the sample's episodes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path


def test_the_replay_report_renders_and_its_timeline_shows_the_episodes(samples: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "stream_rt.cli", "replay", str(samples / "still_motion.mkv"), "--model", "smoke",
         "--report", str(report), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"report: {report / 'index.html'}" in done.stderr
    summary = json.loads((report / "summary.json").read_text())
    starts = [e["start_s"] for e in summary["episodes"]]
    assert [round(s) for s in starts] == [20, 51, 74], "still_motion.mkv moves at 20 s, 51 s and 74 s"
    assert summary["smoke_model"] and summary["answers"]["ok"] == sum(e["calls"] for e in summary["episodes"])

    browser = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--dump-dom", (report / "index.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert browser.returncode == 0, browser.stderr[-2000:]
    console = [line for line in browser.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    dom = browser.stdout
    bands = re.findall(r'class="episode-band" data-event-id="([^"]+)"', dom)
    assert bands == [e["event_id"] for e in summary["episodes"]], "one band per episode on the timeline"
    calls = re.findall(r'class="call" data-status="(\w+)"', dom)
    assert len(calls) == summary["answers"]["ok"]
    images = re.findall(r'<img src="([^"]+)"', dom)
    assert len(images) == sum(len(e["thumbnails"]) for e in summary["episodes"]) >= 3
    assert all((report / src).stat().st_size > 1000 for src in images), "every thumbnail is a real picture"
    assert "not meaningful" in dom, "smoke answers are labelled"

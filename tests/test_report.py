"""The replay report, rendered by a real headless Chromium: no console errors, every
thumbnail there and linked to its full frame, the timeline shows the sample's episodes
and its labels, and each model call shows the question, what was heard and every field of
the answer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import av

SMOKE_ANSWER = {"summary": "smoke test", "action": "none", "condition_met": "no", "confidence": "0.00"}
"""What the smoke model's answer (stream_rt.mllm.smoke.SMOKE_ANSWER) shows in a call's row."""


def replay(sample: Path, report: Path, *extra: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "stream_rt.cli", "replay", str(sample), "--model", "smoke", "--report", str(report),
         "--no-progress", *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"report: {report / 'index.html'}" in done.stderr
    return json.loads((report / "summary.json").read_text())


def render(page: Path) -> str:
    """The page's DOM after Chromium loaded it; no console message."""
    browser = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert browser.returncode == 0, browser.stderr[-2000:]
    console = [line for line in browser.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    return browser.stdout


class CallRows(HTMLParser):
    """The rendered calls' rows: each row's attributes and the text of its cells, by class."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[dict[str, str], dict[str, str]]] = []
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr" and "call-row" in a.get("class", "").split():
            self.rows.append((a, {}))
        elif tag == "td" and self.rows and self._cell is None:
            self._cell = a.get("class", "").split()[0]
            self.rows[-1][1][self._cell] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" or (tag == "tr" and self._cell is not None):
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            cells = self.rows[-1][1]
            cells[self._cell] = (cells[self._cell] + " " + data).strip()


def test_the_replay_report_renders_and_its_timeline_shows_the_episodes_and_labels(
    samples: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    summary = replay(samples / "still_motion.mkv", report, "--labels", str(samples / "still_motion.json"))
    starts = [e["start_s"] for e in summary["episodes"]]
    assert [round(s) for s in starts] == [20, 51, 74], "still_motion.mkv moves at 20 s, 51 s and 74 s"
    assert summary["smoke_model"] and summary["answers"]["ok"] == sum(e["calls"] for e in summary["episodes"])

    dom = render(report / "index.html")
    bands = re.findall(r'class="episode-band" data-event-id="([^"]+)" x="([\d.]+)"', dom)
    assert [b[0] for b in bands] == [e["event_id"] for e in summary["episodes"]], "one band per episode"
    calls = re.findall(r'class="call" data-status="(\w+)"', dom)
    assert len(calls) == summary["answers"]["ok"]
    # The labels on the same time axis as the episodes: each motion label starts where its episode does.
    labels = re.findall(
        r'class="label" data-kind="(\w+)" data-start-s="([\d.]+)" data-end-s="([\d.]+)" x="([\d.]+)"', dom
    )
    truth = json.loads((samples / "still_motion.json").read_text())["motion"]
    assert [(k, float(a), float(b)) for k, a, b, _ in labels] == [("motion", m["start_s"], m["end_s"]) for m in truth]
    px_per_s = 990 / summary["duration_s"]  # the plot's width over the media's duration
    for (_, _, _, x), (_, band_x) in zip(labels, bands, strict=True):
        assert abs(float(x) - float(band_x)) < 1.5 * px_per_s, "a label drawn within 1.5 s of its episode's start"

    # Every thumbnail is a real picture, and a link to the full frame beside it.
    links = re.findall(r'<a class="frame" href="([^"]+)"><img src="([^"]+)"', dom)
    assert len(links) == sum(len(e["thumbnails"]) for e in summary["episodes"]) >= 3
    for full, thumb in links:
        assert (report / thumb).stat().st_size > 1000
        with av.open(str(report / full)) as image, av.open(str(samples / "still_motion.mkv")) as video:
            frame, source = image.streams.video[0], video.streams.video[0]
            assert (frame.width, frame.height) == (source.width, source.height), "the full frame, not a thumbnail"
    assert "not meaningful" in dom, "smoke answers are labelled"


def test_each_call_shows_its_question_what_was_heard_and_every_field_of_its_answer(
    samples: Path, tmp_path: Path
) -> None:
    """walkway_speech.mkv: people walk the whole time (one long episode, a call every 10 s)
    while five LibriVox readings play; each call's row says what was said since the
    episode's previous call."""
    report = tmp_path / "report"
    summary = replay(samples / "walkway_speech.mkv", report, "--labels", str(samples / "walkway_speech.json"))
    [episode] = summary["episodes"]
    dom = render(report / "index.html")
    parser = CallRows()
    parser.feed(dom)
    assert len(parser.rows) == len(episode["answers"]) == episode["calls"] >= 6

    heard = 0
    for (attrs, cells), call in zip(parser.rows, episode["answers"], strict=True):
        assert attrs["data-status"] == call["status"]
        assert cells["question"] == call["question"] and "What is happening" in cells["question"]
        if call["heard"]:
            heard += 1
            assert cells["heard"] == call["heard"]
        else:
            assert cells["heard"] == "—"
        if call["status"] == "ok":
            assert {k: cells[k] for k in SMOKE_ANSWER} == SMOKE_ANSWER
        else:  # the smoke model often rambles past the contract once the prompt quotes what was heard
            assert (call["error"] or call["status"]) in cells["summary"]
            assert all(cells[k] == "—" for k in ("action", "condition_met", "confidence"))
    # What was heard is the speech of the labels: each reading's words reach a call after it.
    assert heard >= 4, [c["heard"] for c in episode["answers"]]
    assert any(c["status"] == "ok" for c in episode["answers"]), "some call's answer has all its fields"
    said = " ".join(c["heard"] for c in episode["answers"])
    assert "married" in said and "respectable" in said, said
    # ...and the episode's card quotes all that was said in it, model or not.
    assert "amiable" in episode["heard"] and f"Heard: \u201c{' '.join(episode['heard'].split()[:3])}" in dom

    spans = re.findall(r'class="label" data-kind="speech" data-start-s="([\d.]+)"', dom)
    assert len(spans) == 5, "the five labelled readings on the timeline"


def test_labels_that_cannot_be_drawn_are_one_clear_line(samples: Path, tmp_path: Path) -> None:
    bad = tmp_path / "labels.json"
    for text, said in (("{", "cannot read labels"), ('{"noise_sigma": 2.5}', "no labelled intervals"),
                       ('{"motion": [{"start_s": 9, "end_s": 3}]}', "ends before it starts")):  # fmt: skip
        bad.write_text(text)
        done = subprocess.run(
            [sys.executable, "-m", "stream_rt.cli", "replay", str(samples / "still_motion.mkv"), "--report",
             str(tmp_path / "report"), "--labels", str(bad)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr

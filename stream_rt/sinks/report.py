"""The replay report: what happened in a recording, on one HTML page.

:class:`ReportSink` records, as compactly as it can, every salience step (score and
components), every event, and every model answer with its token counts; at the end of
the stream :func:`write_report` writes into a directory:

- ``index.html``: a timeline (salience with its components and the trigger's thresholds,
  the labelled intervals when some are given, the episodes as bands, each model call as
  a mark coloured by its status, the visual tokens of each call split into computed,
  reused and compressed away, and the memory prefix) drawn as inline SVG — no script,
  no network — then one card per episode with what was heard in it (its transcript), its
  keyframe thumbnails and one row per
  model call: the question asked, what was heard in the event's span (its transcript),
  and every field of the answer (``summary``, ``action``, ``condition_met``,
  ``confidence``), or the status and why for a call that gave none; calls outside any
  episode (a standing watch's checks) follow in a card of their own;
- ``summary.json``: the same in machine-readable form;
- ``thumbs/``: the keyframes, as small JPEGs (each a link to the full frame beside it,
  ``<name>-full.jpg``), with the source's masks shaded, its zones outlined (yellow), the
  changed regions (red) and the detected objects (green; grey when stationary) drawn on
  them.
"""

from __future__ import annotations

import asyncio
import html
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream_rt.graph.node import Context, Sink
from stream_rt.graph.packets import Event, MllmAnswer, Packet, Salience
from stream_rt.media.images import rgb_to_jpeg, scale_image
from stream_rt.sinks.overlay import Layout, overlay

THUMB_WIDTH = 240
MAX_THUMBS_PER_EPISODE = 4
MAX_TEXT = 2000
"""The most characters of an invalid answer's raw text the report keeps."""
STATUS_COLOURS = {"ok": "#2a9d4b", "invalid": "#e0a100", "reused": "#5b8def", "dropped": "#999999",
                  "error": "#d43c3c", "timeout": "#a0288c"}  # fmt: skip


@dataclass
class Episode:
    event_id: str
    source_id: str
    start_s: float
    end_s: float | None = None
    peak: float = 0.0
    components: dict[str, float] = field(default_factory=dict)
    thumbs: list[tuple[float, str]] = field(default_factory=list)  # (time, file name of the thumbnail)
    answers: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0
    heard: list[str] = field(default_factory=list)  # the words its events carried, in order


class ReportSink(Sink):
    inputs = {"salience": (Salience,), "events": (Event,), "answers": (MllmAnswer,)}

    def __init__(
        self,
        name: str,
        directory: Path,
        title: str,
        thresholds: tuple[float, float],
        layouts: Mapping[str, Layout] | None = None,
        labels: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    ) -> None:
        """``layouts``: each source's masks and zones, drawn on its thumbnails; ``labels``:
        labelled intervals (media seconds) by kind, drawn on the timeline."""
        super().__init__(name)
        self.layouts = dict(layouts or {})
        self.labels = {kind: list(spans) for kind, spans in (labels or {}).items()}
        self.directory = Path(directory)
        self.title = title
        self.thresholds = thresholds
        self.salience: list[tuple[float, float, dict[str, float]]] = []
        self.episodes: dict[str, Episode] = {}
        self.answers: list[dict[str, Any]] = []
        self.heard: dict[tuple[str, int], str] = {}  # (event id, seq) of an event that asked -> its transcript

    async def start(self, ctx: Context) -> None:
        (self.directory / "thumbs").mkdir(parents=True, exist_ok=True)

    async def process(self, packet: Packet, ctx: Context) -> None:
        t = packet.pts_ns / 1e9
        if isinstance(packet, Salience):
            self.salience.append((t, packet.score, {k: round(v, 3) for k, v in packet.components.items()}))
        elif isinstance(packet, Event):
            if packet.call_model:
                self.heard[(packet.event_id, packet.seq)] = " ".join(w.text for w in packet.words)
            await self._event(packet, t)
        elif isinstance(packet, MllmAnswer):
            record = call_record(packet)
            self.answers.append(record)
            episode = self.episodes.get(packet.event_id)
            if episode is not None:
                episode.answers.append(record)

    async def _event(self, event: Event, t: float) -> None:
        if event.type == "check":  # a watch's re-check outside any episode: not an episode
            return
        episode = self.episodes.get(event.event_id)
        if episode is None:
            episode = self.episodes[event.event_id] = Episode(event.event_id, event.source_id, event.start_pts_ns / 1e9)
        episode.peak = max(episode.peak, event.score)
        if event.score >= episode.peak:
            episode.components = {k: round(v, 3) for k, v in event.components.items()}
        if event.type == "end":
            episode.end_s = t
        if event.call_model:
            episode.calls += 1
        episode.heard.extend(w.text for w in event.words)
        if event.frame is not None and event.type != "end" and len(episode.thumbs) < MAX_THUMBS_PER_EPISODE:
            name = f"{event.event_id}-{len(episode.thumbs)}.jpg"
            episode.thumbs.append((round(t, 2), name))
            await asyncio.to_thread(self._keyframe, event, name)

    def _keyframe(self, event: Event, name: str) -> None:
        """The event's frame with its overlay, full size (``<name>-full.jpg``) and as a thumbnail."""
        assert event.frame is not None
        rgb = overlay(event.frame.rgb(), event, self.layouts.get(event.source_id))
        height = max(2, round(rgb.shape[0] * THUMB_WIDTH / rgb.shape[1] / 2) * 2)
        (self.directory / "thumbs" / full_frame(name)).write_bytes(rgb_to_jpeg(rgb))
        (self.directory / "thumbs" / name).write_bytes(rgb_to_jpeg(scale_image(rgb, THUMB_WIDTH, height)))

    async def stop(self, ctx: Context) -> None:
        write_report(self)


def full_frame(thumbnail: str) -> str:
    """The file name of a thumbnail's full-size frame, beside it."""
    return thumbnail.removesuffix(".jpg") + "-full.jpg"


def call_record(answer: MllmAnswer) -> dict[str, Any]:
    """What the report shows of one model call: the question, every field of the answer
    contract (``None`` where the answer has none), and for a call without an answer its
    status, its error and (invalid) the model's raw text; ``heard`` is filled in from the
    event it answers when the report is written."""
    fields = answer.answer or {}
    return {"t": round(answer.pts_ns / 1e9, 3), "event_id": answer.event_id, "seq": answer.seq,
            "status": answer.status, "question": answer.question, "heard": "",
            "summary": str(fields.get("summary", "")), "action": fields.get("action"),
            "condition_met": fields.get("condition_met"), "confidence": fields.get("confidence"),
            "error": answer.error, "text": answer.text[:MAX_TEXT] if answer.status == "invalid" else "",
            "tokens": dict(answer.tokens), "smoke": answer.smoke,
            "seconds": round(answer.timings.get("total", 0.0), 3)}  # fmt: skip


def write_report(report: ReportSink) -> None:
    for call in report.answers:  # the event and its answer come on different edges, in either order
        call["heard"] = report.heard.get((call["event_id"], call["seq"]), "")
    episodes = sorted(report.episodes.values(), key=lambda e: e.start_s)
    duration = max([s[0] for s in report.salience] + [a["t"] for a in report.answers] + [0.0])
    for episode in episodes:
        if episode.end_s is None:
            episode.end_s = duration
    summary = {
        "title": report.title,
        "duration_s": round(duration, 3),
        "thresholds": {"on": report.thresholds[0], "off": report.thresholds[1]},
        "episodes": [
            {"event_id": e.event_id, "source_id": e.source_id, "start_s": round(e.start_s, 3),
             "end_s": round(e.end_s or duration, 3), "peak": round(e.peak, 3), "components": e.components,
             "calls": e.calls, "heard": " ".join(e.heard), "thumbnails": [f"thumbs/{name}" for _, name in e.thumbs],
             "frames": [f"thumbs/{full_frame(name)}" for _, name in e.thumbs], "answers": e.answers}
            for e in episodes
        ],
        "other_calls": _outside(report),
        "labels": {kind: [[round(a, 3), round(b, 3)] for a, b in spans] for kind, spans in report.labels.items()},
        "answers": {status: sum(a["status"] == status for a in report.answers) for status in STATUS_COLOURS},
        "smoke_model": any(a["smoke"] for a in report.answers),
    }  # fmt: skip
    (report.directory / "summary.json").write_text(json.dumps(summary, indent=1))
    (report.directory / "index.html").write_text(_page(report, summary, episodes, duration))


def _page(report: ReportSink, summary: dict[str, Any], episodes: list[Episode], duration: float) -> str:
    e = html.escape
    smoke = (
        '<p class="warn">Answers come from the <b>smoke model</b> (random weights): they are not meaningful.</p>'
        if summary["smoke_model"]
        else ""
    )
    counts = ", ".join(f"{n} {status}" for status, n in summary["answers"].items() if n) or "none"
    cards = []
    for ep in episodes:
        thumbs = "".join(
            f'<figure><a class="frame" href="thumbs/{e(full_frame(name))}"><img src="thumbs/{e(name)}" '
            f'alt="keyframe at {t:.1f} s" width="{THUMB_WIDTH}"></a><figcaption>{t:.1f} s</figcaption></figure>'
            for t, name in ep.thumbs
        )
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(ep.components.items()))
        heard = f'<p class="said">Heard: &ldquo;{e(" ".join(ep.heard))}&rdquo;</p>' if ep.heard else ""
        cards.append(
            f'<section class="episode" id="{e(ep.event_id)}"><h3>{e(ep.event_id)}: {ep.start_s:.1f}&ndash;'
            f"{(ep.end_s or duration):.1f} s</h3><p>peak salience {ep.peak:.2f} ({e(parts)}); {ep.calls} model "
            f'call(s)</p>{heard}<div class="thumbs">{thumbs}</div>{_calls(ep.answers)}</section>'
        )
    if summary["other_calls"]:
        others = _calls(summary["other_calls"])
        cards.append('<section class="episode" id="other-calls"><h3>Calls outside any episode</h3>'
                     f"<p>a standing watch's checks of the view</p>{others}</section>")  # fmt: skip
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(report.title)}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; padding: 0 16px; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 18px; margin-top: 28px; }} h3 {{ font-size: 15px; margin: 0 0 4px; }}
.said {{ font-style: italic; }}
.warn {{ background: #fff4d6; border: 1px solid #e0b000; padding: 8px 12px; }}
.episode {{ border: 1px solid #ddd; border-radius: 6px; padding: 12px; margin: 12px 0; }}
.thumbs {{ display: flex; gap: 8px; flex-wrap: wrap; }} figure {{ margin: 0; }}
figcaption {{ font-size: 12px; color: #666; }} ul {{ padding-left: 18px; }}
.dot {{ display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 6px; }}
table.calls {{ border-collapse: collapse; width: 100%; margin-top: 8px; font-size: 13px; }}
table.calls th, table.calls td {{ border-top: 1px solid #eee; padding: 4px 6px; text-align: left; }}
table.calls td {{ vertical-align: top; }}
td.question, td.heard {{ white-space: pre-wrap; max-width: 260px; }} td.heard {{ font-style: italic; }}
td.t {{ white-space: nowrap; }}
.none {{ color: #999; }} .error {{ color: #b22; }} pre {{ white-space: pre-wrap; margin: 4px 0; }}
svg text {{ font: 11px system-ui, sans-serif; fill: #444; }}
</style></head><body>
<h1>{e(report.title)}</h1>
<p>{duration:.1f} s of media; {len(episodes)} episode(s); model answers: {e(counts)}.
Machine-readable: <a href="summary.json">summary.json</a>.</p>
{smoke}
<h2>Timeline</h2>
{_timeline(report, episodes, duration)}
<h2>Episodes</h2>
{"".join(cards) or "<p>No episode: nothing crossed the trigger's threshold.</p>"}
</body></html>
"""


def _outside(report: ReportSink) -> list[dict[str, Any]]:
    """The calls about events outside any episode (a standing watch's checks)."""
    return [a for a in report.answers if a["event_id"] not in report.episodes]


def _calls(calls: list[dict[str, Any]]) -> str:
    """One table row per model call: when, its status, the question, what was heard, and
    every field of the answer; a call without an answer says why (and, invalid, what the
    model said)."""
    if not calls:
        return ""
    e = html.escape

    def cell(name: str, value: object) -> str:
        if value is None or value == "":
            return f'<td class="{name} none">&mdash;</td>'
        if isinstance(value, bool):
            value = "yes" if value else "no"
        elif isinstance(value, float):
            value = f"{value:.2f}"
        return f'<td class="{name}">{e(str(value))}</td>'

    rows = []
    for a in calls:
        if a["status"] in ("ok", "reused"):
            summary = cell("summary", a["summary"])
        else:
            raw = (
                f"<details><summary>what the model said</summary><pre>{e(a['text'])}</pre></details>"
                if a["text"]
                else ""
            )
            summary = f'<td class="summary"><span class="error">{e(a["error"] or a["status"])}</span>{raw}</td>'
        rows.append(
            f'<tr class="call-row" data-event-id="{e(a["event_id"])}" data-seq="{a["seq"]}" '
            f'data-status="{e(a["status"])}">'
            f'<td class="t">{a["t"]:.1f} s</td><td class="status"><span class="dot" '
            f'style="background:{STATUS_COLOURS.get(a["status"], "#000")}"></span>{e(a["status"])}</td>'
            f"{cell('question', a['question'])}{cell('heard', a['heard'])}{summary}{cell('action', a['action'])}"
            f"{cell('condition_met', a['condition_met'])}{cell('confidence', a['confidence'])}</tr>"
        )
    head = ("<tr><th>time</th><th>status</th><th>question asked</th><th>heard</th><th>summary</th><th>action</th>"
            "<th>condition met</th><th>confidence</th></tr>")  # fmt: skip
    return f'<table class="calls">{head}{"".join(rows)}</table>'


def _timeline(report: ReportSink, episodes: list[Episode], duration: float) -> str:
    """Stacked panels sharing the time axis: salience, the labels (when given), model
    calls, tokens."""
    width, left, right = 1060, 50, 20
    plot_w = width - left - right
    span = max(duration, 1e-6)

    def x(t: float) -> float:
        return left + t / span * plot_w

    top, sal_h, calls_h, tok_h = 20, 180, 40, 120
    labels_top, labels_h = top + sal_h + 30, LABEL_ROW * len(report.labels)
    calls_top = labels_top + (labels_h + 30 if report.labels else 0)
    tok_top = calls_top + calls_h + 30
    height = tok_top + tok_h + 40
    out = [f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%">']
    for ep in episodes:  # episode bands across all panels
        x0, x1 = x(ep.start_s), x(ep.end_s if ep.end_s is not None else duration)
        out.append(f'<rect class="episode-band" data-event-id="{html.escape(ep.event_id)}" x="{x0:.1f}" y="{top}" '
                   f'width="{max(1.0, x1 - x0):.1f}" height="{tok_top + tok_h - top}" fill="#f4c542" opacity="0.18">'
                   f"<title>{html.escape(ep.event_id)}</title></rect>")  # fmt: skip

    def y_sal(v: float) -> float:
        return top + sal_h - v * sal_h

    out.append(f'<text x="{left}" y="{top - 6}">salience and its components</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{sal_h}" fill="none" stroke="#ccc"/>')
    for name, value, dash in (("on", report.thresholds[0], "6,3"), ("off", report.thresholds[1], "2,3")):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y_sal(value):.1f}" y2="{y_sal(value):.1f}" '
                   f'stroke="#c0392b" stroke-dasharray="{dash}"/><text x="{left - 28}" y="{y_sal(value) + 4:.1f}">'
                   f"{name}</text>")  # fmt: skip
    series = {"score": [(t, s) for t, s, _ in report.salience]}
    for t, _, components in report.salience:
        for k, v in components.items():
            series.setdefault(k, []).append((t, v))
    colours = ["#222", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
    for i, (name, points) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        thinned = _thin(points, plot_w)
        path = " ".join(f"{x(t):.1f},{y_sal(v):.1f}" for t, v in thinned)
        out.append(f'<polyline class="series" data-name="{html.escape(name)}" points="{path}" fill="none" '
                   f'stroke="{colour}" stroke-width="{1.6 if name == "score" else 1}"/>')  # fmt: skip
        out.append(f'<text x="{left + 200 + 80 * i}" y="{top - 6}" style="fill:{colour}">'
                   f"— {html.escape(name)}</text>")  # fmt: skip

    out.extend(_labels(report.labels, x, left, plot_w, labels_top))
    out.append(f'<text x="{left}" y="{calls_top - 6}">model calls (colour: status)</text>')
    out.append(f'<rect x="{left}" y="{calls_top}" width="{plot_w}" height="{calls_h}" fill="none" stroke="#ccc"/>')
    for a in report.answers:
        colour = STATUS_COLOURS.get(a["status"], "#000")
        said = html.escape(a["summary"] or a["error"])
        out.append(f'<circle class="call" data-status="{a["status"]}" cx="{x(a["t"]):.1f}" '
                   f'cy="{calls_top + calls_h / 2}" r="5" fill="{colour}"><title>{a["t"]:.1f} s {a["status"]}: '
                   f"{said}</title></circle>")  # fmt: skip

    tokens = [(a["t"], a["tokens"]) for a in report.answers if a["tokens"]]
    peak = max([tk.get("visual", 0) + tk.get("visual_dropped", 0) + tk.get("memory", 0) for _, tk in tokens] + [1])
    out.append(f'<text x="{left}" y="{tok_top - 6}">tokens per call (peak {peak}):</text>')
    legend = (("#1f77b4", "visual, computed"), ("#5bc0de", "visual, reused"), ("#c7c7c7", "visual, compressed away"),
              ("#9467bd", "memory prefix"))  # fmt: skip
    for i, (colour, name) in enumerate(legend):
        out.append(f'<text x="{left + 160 + 175 * i}" y="{tok_top - 6}" style="fill:{colour}">■ {name}</text>')
    out.append(f'<rect x="{left}" y="{tok_top}" width="{plot_w}" height="{tok_h}" fill="none" stroke="#ccc"/>')
    for t, tk in tokens:
        y = tok_top + tok_h
        for key, colour in (("visual", "#1f77b4"), ("visual_reused", "#5bc0de"), ("visual_dropped", "#c7c7c7"),
                            ("memory", "#9467bd")):  # fmt: skip
            n = tk.get(key, 0)
            if key == "visual":
                n -= tk.get("visual_reused", 0)
            h = max(0.0, n / peak * tok_h)
            y -= h
            out.append(f'<rect x="{x(t) - 3:.1f}" y="{y:.1f}" width="6" height="{h:.1f}" fill="{colour}">'
                       f"<title>{t:.1f} s {key}: {n}</title></rect>")  # fmt: skip
    for tick in range(6):  # time axis
        t = span * tick / 5
        out.append(f'<text x="{x(t) - 10:.1f}" y="{height - 14}">{t:.0f} s</text>')
    out.append("</svg>")
    return "\n".join(out)


LABEL_ROW = 16
LABEL_COLOURS = ["#2ca02c", "#d62728", "#17becf", "#8c564b", "#e377c2"]


def _labels(labels: dict[str, list[tuple[float, float]]], x: Callable[[float], float], left: float, plot_w: float,
            top: float) -> list[str]:  # fmt: skip
    """The labelled intervals, one row per kind (``--labels``)."""
    if not labels:
        return []
    height = LABEL_ROW * len(labels)
    out = [f'<text x="{left}" y="{top - 6}">labelled intervals</text>',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{height}" fill="none" stroke="#ccc"/>']  # fmt: skip
    for row, (kind, spans) in enumerate(labels.items()):
        colour, y = LABEL_COLOURS[row % len(LABEL_COLOURS)], top + row * LABEL_ROW
        out.append(
            f'<text x="{left - 4}" y="{y + 12}" text-anchor="end" style="fill:{colour}">{html.escape(kind)}</text>'
        )
        for start, end in spans:
            out.append(f'<rect class="label" data-kind="{html.escape(kind)}" data-start-s="{start:g}" '
                       f'data-end-s="{end:g}" x="{x(start):.1f}" y="{y + 2}" width="{max(1.0, x(end) - x(start)):.1f}" '
                       f'height="{LABEL_ROW - 4}" fill="{colour}" opacity="0.7"><title>{html.escape(kind)}: '
                       f"{start:.1f}&ndash;{end:.1f} s</title></rect>")  # fmt: skip
    return out


def _thin(points: list[tuple[float, float]], buckets: int) -> list[tuple[float, float]]:
    """At most two points (min and max) per horizontal pixel, so hours of salience stay light."""
    if len(points) <= 2 * buckets:
        return points
    t0, t1 = points[0][0], points[-1][0]
    groups: dict[int, list[tuple[float, float]]] = {}
    for t, v in points:
        groups.setdefault(int((t - t0) / max(t1 - t0, 1e-9) * (buckets - 1)), []).append((t, v))
    thinned: list[tuple[float, float]] = []
    for group in groups.values():
        lo, hi = min(group, key=lambda p: p[1]), max(group, key=lambda p: p[1])
        thinned.extend(sorted({lo, hi}))
    return thinned

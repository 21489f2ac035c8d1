"""Score the perception gates and the trigger against labelled intervals of real media,
side by side with the baselines users compare them with.

A scenario is a TOML file::

    description = "real speech over quiet background at known times"
    media = "../samples/walkway_speech.mkv"        # relative to the scenario file
    labels = { file = "../samples/walkway_speech.json", key = "speech" }
    # or: intervals = [[20.0, 26.0], [51.0, 59.0]]
    non_events = { light = [[30.0, 34.0]], foliage = [[0.0, 20.0]] }   # optional
    component = "speech"                           # optional: score one modality's episodes
    objects = ["person"]                           # optional: what the detector baseline looks for
    source = { masks = [[[0, 0], [0.2, 0], [0.2, 0.2]]] }   # optional: the source's own keys
    [pipeline]                                     # any pipeline config, without sources
    trigger = { cutoff_s = 2.0 }

The media is replayed as fast as possible through the configured pipeline with lossless
channels, and its episodes are compared with the labels. With ``component``, the
episodes scored are those the trigger (same settings) opens on that component of the
fused salience alone — e.g. the speech of a clip whose video is busy the whole time, with
the video on, so the media-time alignment of audio and video is what is scored.

Every system is scored by the same rules with the same ``tolerance_s``; a baseline's
model calls are its episodes (each an instant, or a detector's episode):

- An episode is **for** a labelled interval when it overlaps it (within ``tolerance_s``)
  and opens no sooner than ``tolerance_s`` before it: one opened sooner, by something
  else, and running on into the label is not for it (its first call saw something else);
- **recall**: share of labelled intervals some episode is for;
- **precision**: share of episodes that are for a labelled interval;
- **false episodes** on labelled non-events (light changes, foliage, people standing
  still, activity outside the watched zone...): episodes that start inside one and are for
  no label, by kind (kinds may overlap) and in all (``false_total``, distinct episodes);
- **onset latency**: media time from a label's start to the start of the first episode
  for it: 0 when an episode is open as the label starts; an instant (a baseline's
  call) before the start sees nothing, so it is the next one at or after the start that
  counts (a label seen only by calls before it: the tolerance);
- **call share**: model calls per decoded video frame (with ``component``: the calls of
  that component's episodes alone); **detector share**: frames the object detector ran on.

The baselines, beside stream_rt on the same media:

- ``1 call/s``: a frame to the model every second, whatever happens (a naive agent);
- ``livekit``: LiveKit Agents' adaptive sampling: one frame a second while someone
  speaks (Silero VAD, read from the same audio analysis), one every 3.3 s otherwise;
- ``frigate``: a Frigate-style gate: plain motion (no light model, no busy patches) →
  the same COCO detector at 5 frames a second on motion → an episode while an object of
  ``objects`` (default person) moves, and one model call per episode (as Frigate's
  GenAI describes each tracked object once). It runs where the scenario has video and
  scores the whole pipeline (not one ``component``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stream_rt.config import Config, ConfigError, for_replay, parse_config
from stream_rt.config.perception import DEFAULT_WEIGHTS
from stream_rt.graph.node import Context, Node
from stream_rt.graph.packets import Event, Packet, Salience, SourceStatus, StreamEnded
from stream_rt.pipeline import build_pipeline
from stream_rt.policies.trigger import TriggerPolicy
from stream_rt.sinks.callback import CallbackSink

Interval = tuple[float, float]

FRIGATE_DETECT_FPS = 5.0
"""Frigate's default detection rate."""
LIVEKIT_SPEAKING_S, LIVEKIT_QUIET_S = 1.0, 1 / 0.3
"""LiveKit Agents' video sampling: 1 frame/s while the user speaks, 0.3 frame/s otherwise."""


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    media: Path
    intervals: list[Interval]
    pipeline: dict[str, Any]
    tolerance_s: float = 1.0
    component: str | None = None
    non_events: dict[str, list[Interval]] = dataclasses.field(default_factory=dict)
    objects: tuple[str, ...] = ("person",)
    source: dict[str, Any] = dataclasses.field(default_factory=dict)  # the source's own keys (zones, objects...)


@dataclass(frozen=True)
class Score:
    recall: float
    precision: float
    false_episodes: dict[str, int]  # by kind (kinds may overlap: a light change while people stand)
    false_total: int  # distinct episodes
    latency_p95_s: float
    latency_mean_s: float
    calls: int
    frames: int
    call_share: float
    episodes: int
    detector_share: float = 0.0


@dataclass
class Run:
    """What one replay of a scenario gave."""

    events: list[Event]
    frames: int
    duration_s: float
    detector_runs: int
    speech: list[tuple[float, float]]  # (media time, speech probability) of each fused step


KEYS = {"description", "media", "labels", "intervals", "pipeline", "source", "tolerance_s", "component", "non_events",
        "objects"}  # fmt: skip


def read_labels(path: str | Path) -> dict[str, list[Interval]]:
    """The labelled intervals of a labels file (``scripts/fetch_samples.py`` writes one beside
    each sample): a JSON object whose lists of ``{"start_s", "end_s", ...}`` objects are
    labelled intervals in media seconds, by kind (``{"motion": [{"start_s": 20.0, "end_s":
    26.0}], "noise_sigma": 2.5}``: one kind, ``motion``; other keys are notes). A file that
    cannot be read, or holds no interval, raises :class:`ConfigError` saying why."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read labels: {exc}") from None
    kinds: dict[str, list[Interval]] = {}
    for kind, rows in data.items() if isinstance(data, dict) else ():
        if (
            isinstance(rows, list)
            and rows
            and all(isinstance(r, dict) and {"start_s", "end_s"} <= r.keys() for r in rows)
        ):
            try:
                kinds[kind] = [(float(r["start_s"]), float(r["end_s"])) for r in rows]
            except (TypeError, ValueError):
                raise ConfigError(f"{path}: '{kind}' has an interval whose times are not numbers") from None
            if any(not 0 <= a <= b for a, b in kinds[kind]):
                raise ConfigError(f"{path}: '{kind}' has an interval that ends before it starts, or starts before 0")
    if not kinds:
        raise ConfigError(f'{path}: no labelled intervals (a JSON object like {{"motion": [{{"start_s": 20.0, '
                          f'"end_s": 26.0}}]}})')  # fmt: skip
    return kinds


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read scenario: {exc}") from None
    unknown = set(data) - KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown scenario keys: {', '.join(sorted(unknown))}")
    base = path.parent
    media = (base / data["media"]).resolve()
    if "intervals" in data:
        intervals = [(float(a), float(b)) for a, b in data["intervals"]]
    else:
        labels = data["labels"]
        kinds = read_labels(base / labels["file"])
        if labels["key"] not in kinds:
            raise ConfigError(f"{path}: {labels['file']} has no '{labels['key']}' labels (it has: {', '.join(kinds)})")
        intervals = kinds[labels["key"]]
    non_events = {kind: [(float(a), float(b)) for a, b in spans] for kind, spans in data.get("non_events", {}).items()}
    return Scenario(
        name=path.stem,
        description=data.get("description", ""),
        media=media,
        intervals=intervals,
        pipeline=data.get("pipeline", {}),
        tolerance_s=float(data.get("tolerance_s", 1.0)),
        component=data.get("component"),
        non_events=non_events,
        objects=tuple(data.get("objects", ("person",))),
        source=data.get("source", {}),
    )


async def run_scenario(scenario: Scenario) -> Run:
    """Replay the scenario's media through its pipeline."""
    if not scenario.media.exists():
        raise ConfigError(f"{scenario.media} is missing: run 'python scripts/fetch_samples.py'")
    source = {**scenario.source, "id": scenario.name, "url": str(scenario.media)}
    config = for_replay(parse_config({"sources": [source], **scenario.pipeline}, origin=scenario.name))
    built = build_pipeline(config, speed=None)
    if built.trigger is None:
        raise ConfigError(f"{scenario.name}: the pipeline has no gates enabled, so nothing can trigger")
    graph = built.graph
    events: list[Event] = []
    speech: list[tuple[float, float]] = []
    graph.add(CallbackSink("evaluation", events.append))
    graph.add(CallbackSink("steps", lambda s: speech.append((s.pts_ns / 1e9, s.components["speech"]))))
    graph.connect("salience.salience", "steps.in", capacity=64)
    if scenario.component is None:
        graph.connect("trigger.events", "evaluation.in", capacity=64)
    else:  # the same trigger, on one component of the same fused salience
        name = scenario.component
        graph.add(ComponentOnly(f"{name}_only", name, config))
        graph.add(TriggerPolicy(f"{name}_trigger", config.trigger))
        graph.connect("salience.salience", f"{name}_only.salience", capacity=64)
        graph.connect(f"{name}_only.salience", f"{name}_trigger.salience")
        graph.connect(f"{name}_trigger.events", "evaluation.in", capacity=64)
    await graph.run()
    nodes = graph.statistics()["nodes"]
    frames = int(nodes[scenario.name].get("frames", 0))
    runs = int(nodes.get("objects", {}).get("detector_runs", 0))
    return Run(events, frames, built.sources[0].position_s, runs, speech)


class ComponentOnly(Node):
    """Salience reduced to one component (weighted as the fusion weighs it), with the
    sources' statuses and ends passed on."""

    inputs = {"salience": (Salience,)}
    outputs = {"salience": (Salience,)}

    def __init__(self, name: str, component: str, config: Config) -> None:
        super().__init__(name)
        weights = {**DEFAULT_WEIGHTS, **{str(k): v for k, v in config.salience.weights.items()}}
        if component not in weights:
            raise ConfigError(f"unknown salience component '{component}' (components: {', '.join(DEFAULT_WEIGHTS)})")
        self.component, self.weight = component, weights[component]

    async def process(self, packet: Packet, ctx: Context) -> None:
        assert isinstance(packet, Salience)
        score = min(1.0, self.weight * packet.components[self.component])
        await ctx.emit("salience", dataclasses.replace(packet, score=score))

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, SourceStatus | StreamEnded):
            await ctx.emit("salience", packet)


def episodes_of(events: list[Event]) -> list[tuple[float, float, int]]:
    """(start_s, end_s, model calls) of each episode."""
    out: dict[str, list[float]] = {}
    for event in events:
        episode = out.setdefault(event.event_id, [event.start_pts_ns / 1e9, math.inf, 0])
        if event.call_model:
            episode[2] += 1
        if event.type == "end" and event.end_pts_ns is not None:
            episode[1] = event.end_pts_ns / 1e9
    return [(a, b, int(c)) for a, b, c in out.values()]


def _starts_in(episode: Interval, spans: list[Interval]) -> bool:
    return any(a <= episode[0] <= b for a, b in spans)


def score(
    episodes: list[Interval],
    calls: int,
    frames: int,
    intervals: list[Interval],
    tol: float,
    non_events: dict[str, list[Interval]] | None = None,
    detector_runs: int = 0,
) -> Score:
    def is_for(e: Interval, i: Interval) -> bool:
        """``e`` overlaps ``i`` and opened no sooner than the tolerance before it (one opened
        sooner, by something else, and running on into it is not for it)."""
        return e[0] <= i[1] + tol and e[1] >= i[0] - tol and e[0] >= i[0] - tol

    latencies = []
    for interval in intervals:
        hits = [e for e in episodes if is_for(e, interval)]
        if hits:  # open at the label's start: 0; else from the start to the first that opens after it
            seen = [max(0.0, e[0] - interval[0]) for e in hits if e[1] >= interval[0]]
            latencies.append(min(seen) if seen else tol)
    precise = [e for e in episodes if any(is_for(e, i) for i in intervals)]
    unmatched = [e for e in episodes if e not in precise]
    spans_of = non_events or {}
    false = {kind: sum(1 for e in unmatched if _starts_in(e, spans)) for kind, spans in spans_of.items()}
    false_total = sum(1 for e in unmatched if any(_starts_in(e, spans) for spans in spans_of.values()))
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)] if latencies else math.nan
    return Score(
        recall=len(latencies) / len(intervals) if intervals else 1.0,
        precision=len(precise) / len(episodes) if episodes else 1.0,
        false_episodes=false,
        false_total=false_total,
        latency_p95_s=p95,
        latency_mean_s=sum(latencies) / len(latencies) if latencies else math.nan,
        calls=calls,
        frames=frames,
        call_share=calls / frames if frames else math.nan,
        episodes=len(episodes),
        detector_share=detector_runs / frames if frames else 0.0,
    )


def fixed_interval_calls(duration_s: float) -> list[float]:
    """One model call per second, whatever happens."""
    return [float(t) for t in range(int(duration_s) + 1)]


def adaptive_calls(duration_s: float, speech: list[tuple[float, float]]) -> list[float]:
    """LiveKit's sampling: the next frame 1 s after one taken while someone speaks
    (speech probability >= 0.5 at the latest step), 3.3 s after one taken otherwise."""
    calls, t, i, speaking = [], 0.0, 0, False
    while t <= duration_s:
        calls.append(t)
        while i < len(speech) and speech[i][0] <= t:
            speaking = speech[i][1] >= 0.5
            i += 1
        t += LIVEKIT_SPEAKING_S if speaking else LIVEKIT_QUIET_S
    return calls


def frigate_pipeline(scenario: Scenario) -> dict[str, Any]:
    """The scenario's pipeline as a Frigate-style motion -> detector gate."""
    pipeline = {k: v for k, v in scenario.pipeline.items() if k not in ("change", "detect", "audio")}
    pipeline["change"] = {**scenario.pipeline.get("change", {}), "light": False, "busy_share": 0.0}
    pipeline["detect"] = {"enabled": True, "detect_fps": FRIGATE_DETECT_FPS, "stationary_s": 10.0}
    pipeline["audio"] = {"enabled": False}
    return pipeline


async def evaluate(path: str | Path, frigate: bool = True) -> dict[str, Any]:
    """Score the scenario at ``path``: stream_rt and the baselines (``frigate``: with the
    Frigate-style one)."""
    scenario = load_scenario(path)
    tol, labels, non_events = scenario.tolerance_s, scenario.intervals, scenario.non_events
    ours_run = await run_scenario(scenario)
    episodes = episodes_of(ours_run.events)
    frames = ours_run.frames
    ours = [(a, b) for a, b, _ in episodes]
    results = {
        "stream_rt": score(ours, sum(c for *_, c in episodes), frames, labels, tol, non_events, ours_run.detector_runs)
    }
    for name, instants in (
        ("1 call/s", fixed_interval_calls(ours_run.duration_s)),
        ("livekit", adaptive_calls(ours_run.duration_s, ours_run.speech)),
    ):
        results[name] = score([(t, t) for t in instants], len(instants), frames, labels, tol, non_events)
    if frigate and frames and scenario.component is None:  # a detector gate is scored on what it can see
        gate = dataclasses.replace(
            scenario, component=None, pipeline=frigate_pipeline(scenario),
            source={**scenario.source, "objects": list(scenario.objects)},
        )  # fmt: skip
        frigate_run = await run_scenario(gate)
        theirs = [(a, b) for a, b, _ in episodes_of(frigate_run.events)]
        results["frigate"] = score(theirs, len(theirs), frames, labels, tol, non_events, frigate_run.detector_runs)
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "component": scenario.component,
        "labels": len(labels),
        "non_events": {kind: len(spans) for kind, spans in non_events.items()},
        "media_s": round(ours_run.duration_s, 2),
        **{name: _rounded(asdict(result)) for name, result in results.items()},
    }


SYSTEMS = ("stream_rt", "1 call/s", "livekit", "frigate")


def format_report(result: dict[str, Any]) -> str:
    non_events = ", ".join(f"{n} {k}" for k, n in result.get("non_events", {}).items())
    lines = [f"{result['scenario']}: {result['description']} ({result['labels']} labelled intervals"
             f"{', non-events: ' + non_events if non_events else ''}; {result['media_s']} s)"]  # fmt: skip
    lines.append(
        f"  {'':18} {'recall':>7} {'precision':>9} {'false':>6} {'p95 onset':>10} {'calls':>6} {'calls/frame':>12} "
        f"{'detector/frame':>15}"
    )
    component = result.get("component")
    for name in SYSTEMS:
        s = result.get(name)
        if s is None:
            continue
        label = f"stream_rt[{component}]" if name == "stream_rt" and component else name
        false = s["false_total"]
        lines.append(
            f"  {label:18} {s['recall']:7.3f} {s['precision']:9.3f} {false:6d} {s['latency_p95_s']:9.3f}s "
            f"{s['calls']:6d} {s['call_share']:12.2%} {s['detector_share']:15.2%}"
        )
    return "\n".join(lines)


def _rounded(record: dict[str, Any]) -> dict[str, Any]:
    return {k: _round(v) for k, v in record.items()}


def _round(value: float | int) -> float | int:
    return round(value, 4) if isinstance(value, float) and math.isfinite(value) else value

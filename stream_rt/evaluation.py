"""Score the perception gates and the trigger against labelled intervals of real media.

A scenario is a TOML file::

    description = "real speech over quiet background at known times"
    media = "../samples/walkway_speech.mkv"        # relative to the scenario file
    labels = { file = "../samples/walkway_speech.json", key = "speech" }
    # or: intervals = [[20.0, 26.0], [51.0, 59.0]]
    component = "speech"                           # optional: score one modality's episodes
    [pipeline]                                     # any pipeline config, without sources
    trigger = { cutoff_s = 2.0 }

The media is replayed as fast as possible through the configured pipeline with lossless
channels, and its episodes are compared with the labels. With ``component``, the
episodes scored are those the trigger (same settings) opens on that component of the
fused salience alone — e.g. the speech of a clip whose video is busy the whole time, with
the video on, so the media-time alignment of audio and video is what is scored:

- **recall**: share of labelled intervals overlapped by an episode (within ``tolerance_s``);
- **precision**: share of episodes that overlap a labelled interval (within ``tolerance_s``);
- **onset latency**: media time from a label's start to the start of the first episode
  overlapping it (negative when the episode opened slightly before the label);
- **call share**: model calls the trigger would make, per decoded video frame (with
  ``component``: the calls of that component's episodes alone, not the pipeline's).

Beside it, the fixed-interval baseline (one call per second, as a naive agent would do)
is scored on the same labels.
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
from stream_rt.graph.node import Context, Node
from stream_rt.graph.packets import Event, Packet, Salience, SourceStatus, StreamEnded
from stream_rt.operators.salience import DEFAULT_WEIGHTS
from stream_rt.pipeline import build_pipeline
from stream_rt.policies.trigger import TriggerPolicy
from stream_rt.sinks.callback import CallbackSink


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    media: Path
    intervals: list[tuple[float, float]]
    pipeline: dict[str, Any]
    tolerance_s: float = 1.0
    component: str | None = None


@dataclass(frozen=True)
class Score:
    recall: float
    precision: float
    latency_p95_s: float
    latency_mean_s: float
    calls: int
    frames: int
    call_share: float
    episodes: int


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read scenario: {exc}") from None
    unknown = set(data) - {"description", "media", "labels", "intervals", "pipeline", "tolerance_s", "component"}
    if unknown:
        raise ConfigError(f"{path}: unknown scenario keys: {', '.join(sorted(unknown))}")
    base = path.parent
    media = (base / data["media"]).resolve()
    if "intervals" in data:
        intervals = [(float(a), float(b)) for a, b in data["intervals"]]
    else:
        labels = data["labels"]
        rows = json.loads((base / labels["file"]).read_text())[labels["key"]]
        intervals = [(float(r["start_s"]), float(r["end_s"])) for r in rows]
    return Scenario(
        name=path.stem,
        description=data.get("description", ""),
        media=media,
        intervals=intervals,
        pipeline=data.get("pipeline", {}),
        tolerance_s=float(data.get("tolerance_s", 1.0)),
        component=data.get("component"),
    )


async def run_scenario(scenario: Scenario) -> tuple[list[Event], int, float]:
    """Replay the scenario's media; return its events, the decoded frames and the media length."""
    if not scenario.media.exists():
        raise ConfigError(f"{scenario.media} is missing: run 'python scripts/fetch_samples.py'")
    config = for_replay(
        parse_config({"sources": [{"id": scenario.name, "url": str(scenario.media)}], **scenario.pipeline},
                     origin=scenario.name)
    )  # fmt: skip
    pipeline = build_pipeline(config, speed=None)
    if pipeline.trigger is None:
        raise ConfigError(f"{scenario.name}: the pipeline has no gates enabled, so nothing can trigger")
    events: list[Event] = []
    pipeline.graph.add(CallbackSink("evaluation", events.append))  # type: ignore[arg-type]
    if scenario.component is None:
        pipeline.graph.connect("trigger.events", "evaluation.in", capacity=64)
    else:  # the same trigger, on one component of the same fused salience
        pipeline.graph.add(ComponentOnly(f"{scenario.component}_only", scenario.component, config))
        pipeline.graph.add(TriggerPolicy(f"{scenario.component}_trigger", **config.trigger.model_dump()))
        pipeline.graph.connect("salience.salience", f"{scenario.component}_only.salience", capacity=64)
        pipeline.graph.connect(f"{scenario.component}_only.salience", f"{scenario.component}_trigger.salience")
        pipeline.graph.connect(f"{scenario.component}_trigger.events", "evaluation.in", capacity=64)
    await pipeline.graph.run()
    frames = int(pipeline.graph.statistics()["nodes"][scenario.name].get("frames", 0))
    return events, frames, pipeline.sources[0].position_s


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


def score(
    episodes: list[tuple[float, float]], calls: int, frames: int, intervals: list[tuple[float, float]], tol: float
) -> Score:
    def overlaps(e: tuple[float, float], i: tuple[float, float]) -> bool:
        return e[0] <= i[1] + tol and e[1] >= i[0] - tol

    latencies = []
    for interval in intervals:
        hits = [e for e in episodes if overlaps(e, interval)]
        if hits:
            latencies.append(min(e[0] for e in hits) - interval[0])
    precise = sum(1 for e in episodes if any(overlaps(e, i) for i in intervals))
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)] if latencies else math.nan
    return Score(
        recall=len(latencies) / len(intervals) if intervals else 1.0,
        precision=precise / len(episodes) if episodes else 1.0,
        latency_p95_s=p95,
        latency_mean_s=sum(latencies) / len(latencies) if latencies else math.nan,
        calls=calls,
        frames=frames,
        call_share=calls / frames if frames else math.nan,
        episodes=len(episodes),
    )


def fixed_interval_baseline(duration_s: float, frames: int, intervals: list[tuple[float, float]]) -> Score:
    """One model call per second, whatever happens: each call is a one-instant 'episode'."""
    calls = [(float(t), float(t)) for t in range(int(duration_s) + 1)]
    return score(calls, len(calls), frames, intervals, tol=0.0)


async def evaluate(path: str | Path) -> dict[str, Any]:
    scenario = load_scenario(path)
    events, frames, duration = await run_scenario(scenario)
    episodes = episodes_of(events)
    ours = score([(a, b) for a, b, _ in episodes], sum(c for *_, c in episodes), frames, scenario.intervals,
                 scenario.tolerance_s)  # fmt: skip
    baseline = fixed_interval_baseline(duration, frames, scenario.intervals)
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "component": scenario.component,
        "labels": len(scenario.intervals),
        "media_s": round(duration, 2),
        "stream_rt": {k: _round(v) for k, v in asdict(ours).items()},
        "baseline_1hz": {k: _round(v) for k, v in asdict(baseline).items()},
    }


def format_report(result: dict[str, Any]) -> str:
    ours, base = result["stream_rt"], result["baseline_1hz"]
    lines = [f"{result['scenario']}: {result['description']} ({result['labels']} labelled intervals, "
             f"{result['media_s']} s)"]  # fmt: skip
    lines.append(f"  {'':18} {'recall':>7} {'precision':>9} {'p95 onset':>10} {'calls':>6} {'calls/frame':>12}")
    component = result.get("component")
    for name, s in ((f"stream_rt[{component}]" if component else "stream_rt", ours), ("1 call/s", base)):
        lines.append(
            f"  {name:18} {s['recall']:7.3f} {s['precision']:9.3f} {s['latency_p95_s']:9.3f}s "
            f"{s['calls']:6d} {s['call_share']:12.2%}"
        )
    return "\n".join(lines)


def _round(value: float | int) -> float | int:
    return round(value, 4) if isinstance(value, float) and math.isfinite(value) else value

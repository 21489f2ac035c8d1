"""What the CLI shows on a terminal: a progress bar during a replay, a summary at the end."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, TextIO

from stream_rt.graph import Graph
from stream_rt.sources.status import StatusSource


class ProgressBar:
    """Redraws one status line on ``stream`` (only if it is a terminal) every ``period_s``."""

    def __init__(
        self,
        graph: Graph,
        sources: list[StatusSource],
        stream: TextIO = sys.stderr,
        period_s: float = 0.2,
    ) -> None:
        self.graph = graph
        self.sources = sources
        self.stream = stream
        self.period_s = period_s
        self.enabled = stream.isatty()
        self._start = time.monotonic()

    async def run(self) -> None:
        if not self.enabled:
            return
        try:
            while True:
                self.draw()
                await asyncio.sleep(self.period_s)
        finally:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def draw(self) -> None:
        nodes = self.graph.statistics()["nodes"]
        frames = sum(nodes[s.name].get("frames", 0) for s in self.sources)
        elapsed = max(1e-9, time.monotonic() - self._start)
        position = sum(s.position_s for s in self.sources)
        duration = sum(s.duration_s or 0.0 for s in self.sources)
        if duration > 0:
            share = min(1.0, position / duration)
            filled = int(share * 30)
            bar = f"{share:4.0%} |{'#' * filled}{' ' * (30 - filled)}| {position:.1f}/{duration:.1f} s"
        else:
            bar = f"{position:.1f} s"
        self.stream.write(f"\r{bar}  {frames / elapsed:.0f} fps\x1b[K")
        self.stream.flush()


def summary(title: str, stats: dict[str, Any], sources: list[StatusSource], wall_s: float) -> str:
    """A one-screen account of a run: frames, rates, skipped packets, a recording cut short,
    episodes (and, with a model, the steps sent to it, its answers and its calls), the
    speech transcribed, drops per edge, time."""
    nodes = stats["nodes"]
    frames = sum(nodes[s.name].get("frames", 0) for s in sources)
    audio = sum(nodes[s.name].get("audio_chunks", 0) for s in sources)
    media_s = sum(s.position_s for s in sources)
    lines = [title]
    for source in sources:
        counters = nodes[source.name]
        extra = [
            f"{counters[key]} {label}"
            for key, label in (
                ("corrupt_packets", "corrupt packets skipped"),
                ("read_errors", "read errors"),
                ("reconnects", "reconnects"),
                ("pts_fixed", "timestamps repaired"),
            )
            if counters.get(key)
        ]
        if source.cut_short:
            extra.append(f"cut short: {source.cut_short}")
        detail = f" ({source.description})" if source.description else ""
        lines.append(
            f"  source {source.name}{detail}: "
            + ", ".join(
                [
                    f"{counters.get('frames', 0)} frames",
                    f"{counters.get('audio_chunks', 0)} audio chunks",
                    *extra,
                ]
            )
        )
    rate = f"{frames / wall_s:.0f} fps" if wall_s > 0 else "-"
    speed = f", {media_s / wall_s:.1f}x real time" if wall_s > 0 and media_s > 0 else ""
    lines.append(f"  total: {frames} frames, {audio} audio chunks, {media_s:.1f} s of media")
    lines.append(f"  wall time: {wall_s:.2f} s ({rate}{speed})")
    trigger, mllm = nodes.get("trigger"), nodes.get("mllm")
    if trigger is not None:
        # The trigger's model_calls are the events it let ask the model: with no model, nothing asks.
        asked = trigger.get("model_calls", 0)
        skips = ", ".join(f"{n} {k[5:]}" for k, n in sorted(trigger.items()) if k.startswith("skip_"))
        lines.append(
            f"  episodes: {trigger.get('events_new', 0)} new, {trigger.get('events_update', 0)} updates, "
            f"{trigger.get('events_end', 0)} ended"
            + (f"; {asked} sent to the model ({asked / max(1, frames):.2%} of frames)" if mllm is not None else "")
            + (f"; skipped: {skips}" if skips else "")
        )
    heard = nodes.get("transcription")
    if heard is not None:
        skipped = heard.get("speech_skipped_ms", 0) / 1000
        failed = heard.get("transcription_errors", 0)
        lines.append(
            f"  speech transcribed: {heard.get('speech_transcribed_ms', 0) / 1000:.1f} s"
            + (f"; skipped {skipped:.1f} s (the recogniser fell behind)" if skipped else "")
            + (f"; {failed} stretches failed" if failed else "")
        )
    if mllm is not None:
        statuses = ", ".join(f"{n} {k[8:]}" for k, n in sorted(mllm.items()) if k.startswith("answers_"))
        lines.append(f"  answers: {statuses or 'none'} ({mllm.get('model_calls', 0)} model calls)")
    dropped = {name: e for name, e in stats["edges"].items() if e["dropped_total"]}
    if not dropped:
        lines.append("  drops: none")
    for name, edge in dropped.items():
        reasons = ", ".join(f"{n} {why}" for why, n in edge["dropped"].items())
        lines.append(f"  drops on {name} ({edge['policy']}): {reasons}")
    return "\n".join(lines)

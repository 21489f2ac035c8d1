"""The stage's streaming memory: what each call sees of it, the entry each answered call
leaves, and its snapshot — restored at start, written every ``snapshot_interval_s`` and at
stop."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from stream_rt.config import MemoryConfig
from stream_rt.graph.clock import Clock
from stream_rt.graph.node import Context, describe_error
from stream_rt.graph.packets import MllmAnswer, MllmRequest
from stream_rt.memory.streaming import MemoryEntry, StreamingMemory

log = logging.getLogger("stream_rt.mllm")


class MemoryKeeper:
    def __init__(self, settings: MemoryConfig, clock: Clock) -> None:
        self.memory = StreamingMemory(settings.max_entries, settings.anchors, settings.tokens)
        self.snapshot: Path | None = settings.snapshot  # None: not saved (also when a bad one cannot be moved)
        self.snapshot_interval_s = settings.snapshot_interval_s
        self.refresh = settings.refresh
        self.clock = clock
        self._episode: dict[str, tuple[str, tuple[MemoryEntry, ...]]] = {}  # source -> (event id, entries)
        self._saved_at = clock.now_s()

    async def restore(self) -> None:
        """Load the snapshot if there is one; an unreadable one is set aside (never
        overwritten: if it cannot be moved, no snapshot is saved) and the memory starts
        empty."""
        self._saved_at = self.clock.now_s()
        if self.snapshot is not None and self.snapshot.exists():
            await asyncio.to_thread(self._restore, self.snapshot)

    def _restore(self, path: Path) -> None:
        memory = self.memory
        try:
            memory.load(path)
            log.info("memory restored from %s: %d entries", path, sum(len(memory.entries(s)) for s in memory.sources))
            return
        except Exception as exc:
            problem = describe_error(exc)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.clock.wall_ns() / 1e9))
        aside = path.with_name(f"{path.name}.unreadable-{stamp}")
        try:
            path.rename(aside)
            kept = f"kept it as {aside}"
        except OSError as exc:
            self.snapshot = None
            kept = f"cannot move it aside ({exc.strerror}), so no snapshot will be saved"
        log.error("cannot restore the memory from %s (%s); %s; starting empty", path, problem, kept)

    async def save(self) -> None:
        if self.snapshot is not None:
            await asyncio.to_thread(self._save, self.snapshot)

    def _save(self, path: Path) -> None:
        try:
            self.memory.save(path)
        except Exception as exc:
            log.error("cannot write the memory snapshot %s: %s", path, describe_error(exc))

    def seen_by(self, request: MllmRequest) -> tuple[MemoryEntry, ...]:
        """The memory ``request`` sees: the latest, or (``refresh = "episode"``) the memory
        as its episode began, so that the prefix's K/V and token reuse carry through the
        episode."""
        if self.refresh == "call":
            return tuple(self.memory.entries(request.source_id))
        kept = self._episode.get(request.source_id)
        if kept is None or kept[0] != request.event_id:
            kept = (request.event_id, tuple(self.memory.entries(request.source_id)))
            self._episode[request.source_id] = kept
        return kept[1]

    async def remember(self, answer: MllmAnswer, request: MllmRequest, ctx: Context) -> None:
        """A call's keyframe tokens become a memory entry, with the answer's summary when the
        answer kept the contract (the tokens are worth keeping either way)."""
        if answer.visual_summary is None:
            return
        memory = self.memory
        summary = (answer.answer or {}).get("summary", "") if answer.status == "ok" else ""
        merges = memory.counters["merges"]
        start = request.frame_pts[0] if request.frame_pts else request.pts_ns
        await asyncio.to_thread(
            memory.add, request.source_id, start, request.pts_ns, answer.visual_summary, str(summary),
            [request.event_id],
        )  # fmt: skip
        ctx.count("memory_added")
        ctx.count("memory_merges", memory.counters["merges"] - merges)
        if self.snapshot is not None and self.clock.now_s() - self._saved_at >= self.snapshot_interval_s:
            self._saved_at = self.clock.now_s()
            await self.save()

    def gauges(self) -> dict[str, float]:
        entries = [e for source in self.memory.sources for e in self.memory.entries(source)]
        return {"memory_entries": float(len(entries)),
                "memory_visual_tokens": float(sum(e.visual.shape[0] for e in entries))}  # fmt: skip

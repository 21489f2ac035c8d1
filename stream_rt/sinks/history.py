"""Keep every event, answer, transcript and watch transition in the searchable history
(:class:`~stream_rt.memory.history.History`, which the pipeline hands over as a
:class:`HistoryStore` opener: sinks and memory are sibling floors).

Each packet becomes one entry, committed before the next packet is taken (on a thread:
SQLite's writes stay off the event loop), so a killed daemon keeps every entry it took.
A transcript belongs to the episode of its source that was open when it was said (its
event id), if any. Entries are embedded for semantic search behind the writes, in
batches, on a thread: a slow embedder delays only the vectors, and entries left without
one (the daemon stopped or was killed first: a stop does not wait for them) are embedded
at the next start. The history
is pruned to its bounds (``keep_days``, ``max_mb``) at start and then once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from stream_rt.graph.node import Context, Sink, describe_error
from stream_rt.graph.packets import Event, MllmAnswer, Packet, Transcript, WatchState

log = logging.getLogger("stream_rt.history")

PRUNE_EVERY_S = 60.0
EMBED_BATCH = 32


Kind = Literal["event", "answer", "transcript", "watch"]


class Embedder(Protocol):
    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]: ...


class HistoryStore(Protocol):
    """What the sink writes to (:class:`~stream_rt.memory.history.History` is one)."""

    @property
    def path(self) -> object: ...

    @property
    def embedder(self) -> Embedder | None: ...

    def add(self, kind: Kind, source_id: str, event_id: str, wall_ns: int, pts_ns: int, text: str) -> int: ...

    def store_vectors(self, ids: Sequence[int], vectors: npt.NDArray[np.float32]) -> None: ...

    def unembedded(self, limit: int = 256) -> list[tuple[int, str]]: ...

    def prune(self, now_ns: int | None = None) -> int: ...

    def close(self) -> None: ...


class HistorySink(Sink):
    """Writes what reaches ``in`` to the history ``open_store()`` opens (called on a
    thread at start, and again after a restart); it embeds the entries for semantic
    search when the store has an ``embedder``."""

    inputs = {"in": (Event, MllmAnswer, Transcript, WatchState)}

    def __init__(self, name: str, open_store: Callable[[], HistoryStore]) -> None:
        super().__init__(name)
        self.open_store = open_store
        self.history: HistoryStore | None = None
        self._episodes: dict[str, Event] = {}  # each source's open episode (its latest event)
        self._pending: list[tuple[int, str]] = []  # (entry id, text) waiting for their vectors
        self._wakeup = asyncio.Event()
        self._embedding: asyncio.Task[None] | None = None
        self._pruned_at: float | None = None

    async def start(self, ctx: Context) -> None:
        if self.history is None:
            self.history = await asyncio.to_thread(self.open_store)
            how = "full-text and semantic" if self.history.embedder is not None else "full-text"
            log.info("history: %s (%s search)", self.history.path, how)
        await self._prune(ctx)
        if self.history.embedder is not None and self._embedding is None:
            self._pending = await asyncio.to_thread(self.history.unembedded, 100_000)
            self._embedding = asyncio.create_task(self._embed(ctx), name=f"stream_rt:{self.name}:embed")

    async def process(self, packet: Packet, ctx: Context) -> None:
        assert self.history is not None, "HistorySink used before start()"
        entry = self._entry(packet)
        if entry is None:
            return
        kind, event_id, text = entry
        try:
            entry_id = await asyncio.to_thread(
                self.history.add, kind, packet.source_id, event_id, packet.wall_ns, packet.pts_ns, text
            )
        except Exception as exc:  # a full disk, an I/O error: said and counted, the daemon goes on
            ctx.count("history_write_errors")
            log.error("cannot write the history %s: %s", self.history.path, describe_error(exc))
            return
        ctx.count("history_entries")
        if self._embedding is not None:
            self._pending.append((entry_id, text))
            self._wakeup.set()
        if self._pruned_at is None or ctx.clock.now_s() - self._pruned_at >= PRUNE_EVERY_S:
            await self._prune(ctx)

    def _entry(self, packet: Packet) -> tuple[Kind, str, str] | None:
        """The entry of a packet: its kind, event id and text (``None``: nothing to keep)."""
        if isinstance(packet, Event):
            if packet.type in ("new", "update"):
                self._episodes[packet.source_id] = packet
            elif packet.type == "end":
                self._episodes.pop(packet.source_id, None)
            return "event", packet.event_id, event_text(packet)
        if isinstance(packet, MllmAnswer):
            return "answer", packet.event_id, answer_text(packet)
        if isinstance(packet, Transcript):
            if not packet.words:
                return None
            episode = self._episodes.get(packet.source_id)
            within = episode is not None and packet.end_ns >= episode.start_pts_ns
            return "transcript", episode.event_id if episode is not None and within else "", f"Heard: {packet.text}"
        if isinstance(packet, WatchState):
            text = f"Watch '{packet.watch_id}' ({packet.condition}): {packet.state} ({packet.reason})."
            return "watch", packet.event_id, f"{text} {packet.summary}".strip()
        return None

    async def _prune(self, ctx: Context) -> None:
        assert self.history is not None
        self._pruned_at = ctx.clock.now_s()
        try:
            if deleted := await asyncio.to_thread(self.history.prune, ctx.clock.wall_ns()):
                ctx.count("history_pruned", deleted)
        except Exception as exc:
            ctx.count("history_write_errors")
            log.error("cannot prune the history %s: %s", self.history.path, describe_error(exc))

    async def _embed(self, ctx: Context) -> None:
        """Embed the pending entries, a batch at a time, as they come."""
        assert self.history is not None and self.history.embedder is not None
        embedder = self.history.embedder
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, self._pending = self._pending[:EMBED_BATCH], self._pending[EMBED_BATCH:]
            try:
                vectors = await asyncio.to_thread(embedder.embed, [text for _, text in batch])
                await asyncio.to_thread(self.history.store_vectors, [i for i, _ in batch], vectors)
            except Exception as exc:  # left without a vector: found by full-text search, embedded at the next start
                ctx.count("history_embed_errors")
                log.error("cannot embed history entries: %s", describe_error(exc))
                continue
            ctx.count("history_embedded", len(batch))

    async def stop(self, ctx: Context) -> None:
        if self._embedding is not None:  # what is not embedded yet is at the next start: no wait at the stop
            self._embedding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._embedding
            self._embedding = None
        if self.history is not None:
            self.history.close()
            self.history = None


EVENT_PHRASES = {
    "new": "activity began", "update": "activity goes on", "end": "activity ended",
    "ask": "a question about the camera", "check": "a standing watch re-checked",
}  # fmt: skip
COMPONENT_WORDS = {"visual": "motion", "speech": "speech", "loudness": "loud sound", "onset": "a sudden sound"}
"""What each salience component means in the words people search with (those at 0.5 or more)."""


def event_text(event: Event) -> str:
    """What an event says, in words people search for."""
    parts = [f"Event {event.type}: {EVENT_PHRASES.get(event.type, event.type)}."]
    if event.question:
        parts.append(f"Asked: {event.question}")
    if event.reason:
        parts.append(f"Reason: {event.reason.replace('_', ' ')}.")
    if strong := [COMPONENT_WORDS.get(k, k) for k, v in sorted(event.components.items(), key=lambda kv: -kv[1])
                  if v >= 0.5]:  # fmt: skip
        parts.append(f"{', '.join(strong).capitalize()}.")
    if event.components:
        parts.append("Salience " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(event.components.items())) + ".")
    if event.objects:
        parts.append("Seen: " + ", ".join(o.label.replace("_", " ") for o in event.objects) + ".")
    if event.zones:
        parts.append("Zones: " + ", ".join(event.zones) + ".")
    if event.words:
        parts.append("Heard: " + " ".join(w.text for w in event.words))
    return " ".join(parts)


def answer_text(answer: MllmAnswer) -> str:
    """What the model answered (or why it did not)."""
    if answer.answer is None:
        said = answer.text.strip() or answer.error
        return f"No answer ({answer.status}){': ' + said[:500] if said else ''}. Asked: {answer.question}"
    fields = answer.answer
    parts = [f"Answer: {fields.get('summary', '')}"]
    if fields.get("action"):
        parts.append(f"Action: {fields['action']}.")
    if fields.get("condition_met") is not None:
        parts.append(f"Condition met: {'yes' if fields['condition_met'] else 'no'}.")
    parts.append(f"Asked: {answer.question}")
    if answer.smoke:
        parts.append("(smoke model: not meaningful)")
    return " ".join(parts)

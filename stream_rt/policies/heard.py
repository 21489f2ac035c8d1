"""What was said in an event's span: each ``update`` and ``end`` event goes on with the
words spoken since the episode's previous event (at most :data:`MAX_WORDS`, the latest),
so an episode's events together carry its whole transcript and none grows with its length.

The words of a span are known only once the transcriber has passed its end (its
:class:`~stream_rt.graph.packets.TranscribedUntil` mark), so an ``update`` or ``end``
event waits for that mark — on a recorded file for as long as it takes (the result is the
same however fast the replay runs), on a live source at most ``wait_s`` (then it goes on
with the words known, counted as ``words_late``); once the graph is stopping, nothing
waits any more (a stopping daemon loses no event for want of its words). A ``new`` event opens its span: nothing
has been said in it yet, and it never waits. A word that came too late for its event (live)
goes with the episode's next one. An ``ask`` event goes on at once with the words known
from the :data:`ASK_WORDS_S` before it (what was just said is often what is asked about);
``check`` events go on as they are. A source's events keep their order: one waits behind an
earlier one that waits. A source that is offline, or online without an audio stream,
says nothing: its events do not wait.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field, replace

from stream_rt.graph.node import Context, Node
from stream_rt.graph.packets import (
    ALL_TRANSCRIBED_NS,
    EndOfStream,
    Event,
    Packet,
    SourceStatus,
    TranscribedUntil,
    Transcript,
    Word,
)
from stream_rt.graph.waits import first_of

MAX_WORDS = 200
"""The most words one event carries (the latest of its span)."""
KEPT_WORDS = 10_000
"""The most words kept per source for the events to come (speech with no episode open)."""
ASK_WORDS_S = 30.0
"""How far back an ``ask`` event's words go."""


@dataclass
class _Source:
    wait_ns: int | None  # None: wait as long as it takes (recorded files)
    words: deque[Word] = field(default_factory=lambda: deque(maxlen=KEPT_WORDS))  # not yet given to an event
    recent: deque[Word] = field(default_factory=lambda: deque(maxlen=MAX_WORDS))  # for asks
    silent: bool = False  # offline, or online without audio: nothing to wait for
    until_ns: int = -1
    held: deque[Event] = field(default_factory=deque)


class HeardWords(Node):
    """Events ``events`` and the transcriber's ``words`` (:class:`Transcript` and
    :class:`TranscribedUntil`) in; the events out on ``events``, each with the ``words`` of
    its span (see the module docstring). :meth:`expect` names the sources that are
    transcribed and how long their events may wait; the others' events pass as they are."""

    inputs = {"events": (Event,), "words": (Transcript, TranscribedUntil), "status": (SourceStatus,)}
    outputs = {"events": (Event,)}

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._expected: dict[str, float | None] = {}
        self._sources: dict[str, _Source] = {}
        self._timer: asyncio.Task[None] | None = None

    @property
    def expected(self) -> list[str]:
        """The sources whose events get their words."""
        return list(self._expected)

    def expect(self, source_id: str, wait_s: float | None) -> None:
        """``source_id`` is transcribed; its events wait at most ``wait_s`` for their words
        (``None``: as long as it takes, for recorded files)."""
        self._expected[source_id] = wait_s

    async def start(self, ctx: Context) -> None:
        self._timer = asyncio.create_task(self._release_late(ctx), name=f"stream_rt:{self.name}:late")

    async def stop(self, ctx: Context) -> None:
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
            self._timer = None

    async def process(self, packet: Packet, ctx: Context) -> None:
        source = self._source(packet.source_id)
        if isinstance(packet, Event):
            if source is None:
                await ctx.emit("events", packet)
                return
            source.held.append(packet)
        elif source is not None and isinstance(packet, Transcript):
            source.words.extend(packet.words)
            source.recent.extend(packet.words)
        elif source is not None and isinstance(packet, TranscribedUntil):
            source.until_ns = max(source.until_ns, packet.pts_ns)
        if source is not None:
            await self._release(source, ctx)

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, SourceStatus) and (source := self._source(packet.source_id)) is not None:
            source.silent = packet.state == "offline" or (bool(packet.streams) and "audio" not in packet.streams)
            await self._release(source, ctx)
        if isinstance(packet, EndOfStream) and ctx.port == "words":  # the transcriber is done
            await self._let_all_go(ctx)

    def _source(self, source_id: str) -> _Source | None:
        if source_id not in self._expected:
            return None
        source = self._sources.get(source_id)
        if source is None:
            wait = self._expected[source_id]
            source = self._sources[source_id] = _Source(None if wait is None else int(wait * 1e9))
        return source

    async def _release(self, source: _Source, ctx: Context, now_ns: int | None = None) -> None:
        """Let go the source's held events, in order, whose words are known (or late)."""
        while source.held:
            event = source.held[0]
            known = event.type not in ("update", "end") or source.silent or source.until_ns >= event.pts_ns
            if not known:
                if now_ns is None or source.wait_ns is None or now_ns - event.wall_ns < source.wait_ns:
                    return
                ctx.count("words_late", source=event.source_id)
            source.held.popleft()
            await ctx.emit("events", self._with_words(source, event))

    def _with_words(self, source: _Source, event: Event) -> Event:
        if event.type == "ask":
            since = event.pts_ns - int(ASK_WORDS_S * 1e9)
            words = [w for w in source.recent if since <= w.start_ns < event.pts_ns]
        elif event.type in ("new", "update", "end"):
            end = event.end_pts_ns if event.end_pts_ns is not None else event.pts_ns
            # the episode's words not given yet: those of its span, and any that came too late for the previous event
            words = [w for w in source.words if event.start_pts_ns <= w.start_ns < end][-MAX_WORDS:]
            while source.words and source.words[0].start_ns < end:  # every later event's span starts after it
                source.words.popleft()
        else:
            return event
        return replace(event, words=tuple(words)) if words else event

    async def _release_late(self, ctx: Context) -> None:
        """Let go the events that waited ``wait_s`` (live sources: looked at every 0.1 s),
        and every event once the graph is stopping."""
        live = any(wait is not None for wait in self._expected.values())
        while live and not ctx.stopping.is_set():
            await first_of(ctx.stopping.wait(), ctx.clock.sleep(0.1))
            for source in self._sources.values():
                await self._release(source, ctx, ctx.clock.wall_ns())
        await ctx.stopping.wait()
        await self._let_all_go(ctx)

    async def _let_all_go(self, ctx: Context) -> None:
        """Nothing more will be said (or waited for): every held event goes."""
        for source in self._sources.values():
            source.until_ns = ALL_TRANSCRIBED_NS
            await self._release(source, ctx)

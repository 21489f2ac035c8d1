"""The trigger policy: turns salience into episodes and decides which moments are worth
a model call.

Per source, on media time (so replays behave exactly like live runs):

- an episode opens (``new``) once the score has stayed at or above ``on`` for
  ``confirm_s`` (a one-frame blip opens nothing);
- while it lasts, an ``update`` is sent at most every ``update_interval_s``, and only if
  the score is still at or above ``on`` (a scene that has calmed down, or a stationary
  object the background has absorbed, sends none);
- it ends (``end``) after ``cutoff_s`` below ``off`` (hysteresis: between ``off`` and
  ``on`` it neither opens nor ends), or after ``max_episode_s`` (reason
  ``max_duration``) so no episode stays open forever; a source that ends closes its
  open episode (reason ``end_of_stream``).

The budget: ``new`` and ``update`` events would call the model (``call_model``) unless
less than ``cooldown_s`` passed since the last call or the last minute already had
``max_calls_per_min`` calls. Every opportunity that is skipped is counted by reason
(``confirming``, ``below_on``, ``cooldown``, ``rate_limit``), per source. With
``snapshot``, new, update and ask events carry a JPEG of their frame. With
``require_zones``, only a step whose activity touched one of those zones opens an
episode (``outside_zones``): a sound alone, or motion elsewhere, opens none. Events carry
the zones and objects of their step. Every setting can differ per source
(:meth:`TriggerPolicy.configure`).

Episodes follow the source's life: a :class:`~stream_rt.graph.packets.SourceStatus`
``offline`` ends its open episode (reason ``source_offline``) and nothing opens until it
is back ``online``; the next activity is a new episode. A source's
:class:`~stream_rt.graph.packets.StreamEnded` ends its episode (``end_of_stream``) while
other sources go on.

Identity: every event id is ``<source>-<ULID>`` (time-ordered, unique across sources,
restarts and daemons: :mod:`stream_rt.graph.ids`), shared by an episode's ``new``,
``update`` and ``end``; every event's ``seq`` is a per-source number that never repeats,
not even after a restart, so consumers can drop re-sent duplicates by ``event_id`` and
``seq``.

A question asked with :meth:`TriggerPolicy.ask` becomes an ``ask`` event at the source's
next salience, with its own event id, whatever the episode state; when no step comes
within ``ask_wait_s`` (a camera that is up but sends nothing, a source no gate watches),
or the source goes offline or ends, it goes out with the source's last frame (none if it
never sent one), so every acknowledged question gets its event. Questions need an
:class:`~stream_rt.policies.asks.AskLedger` shared with whatever answers them (the
pipeline gives the trigger and the MLLM stage the same one when a model is configured):
a source with too many questions still open, or one that is offline or ended, refuses
the next (:class:`AskRefused`) instead of acknowledging what it could not keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from stream_rt.graph.clock import Clock
from stream_rt.graph.ids import SequenceNumbers, time_ordered_id
from stream_rt.graph.node import Context, Node, describe_error
from stream_rt.graph.packets import EndOfStream, Event, Packet, Salience, SourceStatus, StreamEnded
from stream_rt.images import encode_jpeg
from stream_rt.policies.asks import AskLedger, AskRefused
from stream_rt.policies.watches import WatchBook

log = logging.getLogger("stream_rt.trigger")


@dataclass(frozen=True)
class TriggerSettings:
    on: float = 0.5
    off: float = 0.3
    confirm_s: float = 0.1
    cutoff_s: float = 3.0
    update_interval_s: float = 10.0
    max_episode_s: float = 600.0
    cooldown_s: float = 2.0
    max_calls_per_min: float = 6.0
    snapshot: bool = False
    ask_wait_s: float = 2.0
    require_zones: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.off <= self.on <= 1:
            raise ValueError(f"trigger thresholds need 0 <= off <= on <= 1, got on={self.on}, off={self.off}")

    def ns(self, seconds: float) -> int:
        return int(seconds * 1e9)


@dataclass
class _Episode:
    event_id: str
    start_ns: int
    last_update_ns: int
    peak: float
    below_since_ns: int | None = None


@dataclass
class _SourceState:
    source_id: str
    p: TriggerSettings
    above_since_ns: int | None = None
    episode: _Episode | None = None
    calls: deque[int] = field(default_factory=deque)
    enabled: bool = True
    online: bool = True  # until the source says otherwise
    ended: bool = False  # its stream ended for good
    on: float | None = None
    off: float | None = None
    last_call_ns: int | None = None
    last: Salience | None = None
    questions: deque[_Question] = field(default_factory=deque)  # bounded by the ledger
    check: _Episode | None = None  # the watch re-checks under way outside episodes
    last_check_ns: int | None = None


@dataclass
class _Question:
    event_id: str
    question: str
    asked_ns: int | None  # on the graph clock (None: asked before the graph started)


class TriggerPolicy(Node):
    """Salience (``salience``) in, episode events out on ``events``: ``new`` / ``update`` /
    ``end`` with hysteresis on media time, ``call_model`` set within the per-source budget
    (cooldown, calls per minute), plus ``ask`` and ``check`` events. Every skipped model call
    is counted with its reason (see the module docstring)."""

    inputs = {"salience": (Salience,)}
    outputs = {"events": (Event,)}

    def __init__(
        self,
        name: str,
        *,
        on: float = 0.5,
        off: float = 0.3,
        confirm_s: float = 0.1,
        cutoff_s: float = 3.0,
        update_interval_s: float = 10.0,
        max_episode_s: float = 600.0,
        cooldown_s: float = 2.0,
        max_calls_per_min: float = 6.0,
        snapshot: bool = False,
        ask_wait_s: float = 2.0,
        asks: AskLedger | None = None,
        watches: WatchBook | None = None,
    ) -> None:
        super().__init__(name)
        self.defaults = TriggerSettings(
            on, off, confirm_s, cutoff_s, update_interval_s, max_episode_s, cooldown_s, max_calls_per_min, snapshot,
            ask_wait_s,
        )  # fmt: skip
        self.asks = asks
        self.watches = watches
        self._states: dict[str, _SourceState] = {}
        self._seq = SequenceNumbers()
        self._ended = False
        self._clock: Clock | None = None
        self._waiting: asyncio.Task[None] | None = None
        self._sending = asyncio.Lock()

    def configure(self, source_id: str, require_zones: tuple[str, ...] = (), **settings: float | bool) -> None:
        """Give ``source_id`` settings of its own (the keys given; the rest are the
        defaults); with ``require_zones``, only steps whose activity touched one of them
        open its episodes."""
        p = dataclasses.replace(self.defaults, require_zones=tuple(require_zones), **settings)  # type: ignore[arg-type]
        self._state(source_id).p = p

    def settings(self, source_id: str) -> TriggerSettings:
        return self._state(source_id).p

    def _state(self, source_id: str) -> _SourceState:
        state = self._states.get(source_id)
        if state is None:
            state = self._states[source_id] = _SourceState(source_id, self.defaults)
        return state

    async def start(self, ctx: Context) -> None:
        self._clock = ctx.clock
        if self.asks is not None and self._waiting is None:
            self._waiting = asyncio.create_task(self._ask_deadlines(ctx), name=f"stream_rt:{self.name}:asks")

    async def stop(self, ctx: Context) -> None:
        if self._waiting is not None:
            async with self._sending:  # questions being sent go out first
                self._waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._waiting
            self._waiting = None

    async def _ask_deadlines(self, ctx: Context) -> None:
        """A question whose source sends no step within ``ask_wait_s`` (a camera that is up
        but sends nothing, a source with no gate) is asked about its last frame anyway."""
        while True:
            shortest = min((st.p.ask_wait_s for st in list(self._states.values())), default=self.defaults.ask_wait_s)
            await ctx.clock.sleep(max(0.05, shortest / 4))
            try:
                await self._send(lambda: self._overdue(ctx), ctx)
            except Exception as exc:  # never let the deadlines stop: acknowledged questions depend on them
                log.error("trigger: cannot send overdue questions: %s", describe_error(exc))

    def _overdue(self, ctx: Context) -> list[Event]:
        now = ctx.clock.now_ns()
        events = []
        for source_id, state in list(self._states.items()):
            for question in state.questions:
                if question.asked_ns is None:
                    question.asked_ns = now
            asked = state.questions[0].asked_ns if state.questions else None
            if asked is not None and now - asked >= state.p.ns(state.p.ask_wait_s):
                ctx.count("asks_without_step", source=source_id)
                events += self._questions(source_id, state, state.last, ctx)
        return events

    async def process(self, packet: Packet, ctx: Context) -> None:
        assert isinstance(packet, Salience)
        state = self._state(packet.source_id)
        if not state.online:
            ctx.count("skip_offline", source=packet.source_id)  # a step decoded before the outage, arriving after it
            return
        await self._send(lambda: self.step(packet, ctx), ctx)

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, SourceStatus):
            state = self._state(packet.source_id)
            if packet.state == "online":
                state.online = True
                return
            state.online = False
            await self._send(lambda: self._close(packet.source_id, state, "source_offline", ctx), ctx)
        elif isinstance(packet, StreamEnded):  # this source ended; others may go on
            state = self._state(packet.source_id)
            state.ended = True
            await self._send(lambda: self._close(packet.source_id, state, "end_of_stream", ctx), ctx)
        elif isinstance(packet, EndOfStream):
            # The end of stream reaches this node once every upstream source has ended.
            self._ended = True
            await self._send(lambda: self._close_all(ctx), ctx)

    def _close_all(self, ctx: Context) -> list[Event]:
        return [e for sid, st in list(self._states.items()) for e in self._close(sid, st, "end_of_stream", ctx)]

    async def _send(self, make: Callable[[], list[Event]], ctx: Context) -> None:
        """Emit the events ``make()`` returns. The packet loop and the deadlines both send:
        one at a time, so events leave in the order they were made."""
        async with self._sending:
            for event in make():
                if self._state(event.source_id).p.snapshot and event.type != "end" and event.frame is not None:
                    jpeg = await asyncio.to_thread(encode_jpeg, event.frame)
                    event = dataclasses.replace(event, snapshot_jpeg=jpeg)
                ctx.count(f"events_{event.type}", source=event.source_id)
                await ctx.emit("events", event)

    def _close(self, source_id: str, state: _SourceState, reason: str, ctx: Context) -> list[Event]:
        """A source stopped: its waiting questions go out now, with its last frame, and its
        open episode ends."""
        events = self._questions(source_id, state, state.last, ctx)
        if state.episode is not None and state.last is not None:
            events.append(self._end(state, state.last, reason))
        state.above_since_ns = None
        return events

    def set_enabled(self, source_id: str, enabled: bool) -> None:
        """Let a source open episodes, or not (its open episode ends at its next step)."""
        self._state(source_id).enabled = enabled

    def is_enabled(self, source_id: str) -> bool:
        return self._state(source_id).enabled

    def set_thresholds(self, source_id: str, on: float | None, off: float | None) -> None:
        """Override a source's on/off thresholds (``None`` keeps the current one)."""
        state = self._state(source_id)
        new_on = on if on is not None else (state.on if state.on is not None else state.p.on)
        new_off = off if off is not None else (state.off if state.off is not None else state.p.off)
        if not 0 <= new_off <= new_on <= 1:
            raise ValueError(f"thresholds need 0 <= off <= on <= 1, got on={new_on}, off={new_off}")
        state.on, state.off = new_on, new_off

    def set_watch(self, source_id: str, watch_id: str, condition: str, expires_s: float, recheck_s: float) -> None:
        """Set the source's standing watch (replacing the one it had)."""
        if self.watches is None:
            raise ValueError("no model is configured to check a watch ([mllm] is missing)")
        self.watches.set(source_id, watch_id, condition, expires_s, None, recheck_s)

    def remove_watch(self, source_id: str) -> None:
        if self.watches is None:
            raise ValueError("no model is configured to check a watch ([mllm] is missing)")
        self.watches.remove(source_id)

    def ask(self, source_id: str, question: str) -> str:
        """Queue a question about a source; at its next salience an ``ask`` event carries it
        (and calls the model, outside the budget). Returns that event's id; raises
        :class:`AskRefused` when it cannot be kept (no model, the source offline or ended,
        too many questions still open)."""
        if self.asks is None:
            raise AskRefused("no model is configured to answer questions ([mllm] is missing)")
        state = self._state(source_id)
        if state.ended or self._ended:
            raise AskRefused(f"source '{source_id}' has ended: nothing to look at")
        if not state.online:
            raise AskRefused(f"source '{source_id}' is offline: nothing to look at")
        event_id = f"{source_id}-{time_ordered_id()}"
        self.asks.reserve(source_id, event_id)
        state.questions.append(_Question(event_id, question, self._clock.now_ns() if self._clock else None))
        return event_id

    def _questions(self, source_id: str, state: _SourceState, s: Salience | None, ctx: Context) -> list[Event]:
        """An ``ask`` event for each waiting question, about ``s`` (or, when the source never
        sent anything, about nothing: the model is asked without a picture)."""
        if s is None:
            s = Salience(
                source_id,
                -1,
                0,
                ctx.clock.wall_ns(),
                0.0,
                dict.fromkeys(("visual", "speech", "onset", "loudness"), 0.0),
            )
        events = []
        while state.questions:
            q = state.questions.popleft()
            ctx.count("asks", source=source_id)
            events.append(
                Event(
                    source_id, self._seq.next(source_id, s.wall_ns), s.pts_ns, s.wall_ns, "ask", q.event_id,
                    s.pts_ns, None, s.score, s.score, dict(s.components), s.regions, True, "ask", q.question, None,
                    s.frame, s.zones, s.objects,
                )
            )  # fmt: skip
        return events

    def step(self, s: Salience, ctx: Context) -> list[Event]:
        """The events that salience ``s`` causes (often none)."""
        events = self._step(s, ctx)
        state = self._state(s.source_id)
        if state.episode is None and state.above_since_ns is None and self.watches is not None:
            events += self._recheck(state, s, ctx)  # (not while an episode is being confirmed)
        return events

    def _recheck(self, state: _SourceState, s: Salience, ctx: Context) -> list[Event]:
        """A ``check`` event, outside any episode, when the source's watch is unmet, wants
        re-checking every ``recheck_s`` and the model has not been asked about the source
        for that long. Checks keep to that pace only: they take nothing from the source's
        call budget or cooldown, which stay whole for the episode the watch is waiting for.
        The first comes ``recheck_s`` after the watch is first seen. Checks share an id until
        an episode opens or the watch is met or gone."""
        assert self.watches is not None
        watch = self.watches.of(s.source_id)
        if watch is None or watch.state != "unmet" or not watch.recheck_s or not state.enabled:
            state.check, state.last_check_ns = None, None
            return []
        now = s.pts_ns
        if state.last_check_ns is None:
            state.last_check_ns = now
        asked = max(state.last_check_ns, state.last_call_ns or state.last_check_ns)
        if now - asked < int(watch.recheck_s * 1e9):
            return []
        state.last_check_ns = now
        if state.check is None:
            state.check = _Episode(f"{s.source_id}-{time_ordered_id()}", now, now, s.score)
        ctx.count("watch_checks", source=s.source_id)
        state.check.peak = s.score  # (a check's score is its own)
        return [self._event("check", state, s, True, "watch", state.check)]

    def _step(self, s: Salience, ctx: Context) -> list[Event]:
        state = self._state(s.source_id)
        state.last = s
        now = s.pts_ns
        events = self._questions(s.source_id, state, s, ctx)
        episode = state.episode
        p = state.p
        on = p.on if state.on is None else state.on
        off = p.off if state.off is None else state.off
        if not state.enabled:
            ctx.count("skip_disabled", source=s.source_id)
            if episode is not None:
                events.append(self._end(state, s, "disabled"))
            return events
        if episode is not None:
            episode.peak = max(episode.peak, s.score)
            if now - episode.start_ns >= p.ns(p.max_episode_s):
                events.append(self._end(state, s, "max_duration"))
                episode = None
            elif s.score < off:
                if episode.below_since_ns is None:
                    episode.below_since_ns = now
                if now - episode.below_since_ns >= p.ns(p.cutoff_s):
                    events.append(self._end(state, s, "quiet"))
                    return events
            else:
                episode.below_since_ns = None
        if episode is None:
            if p.require_zones and s.score >= on and not set(s.zones) & set(p.require_zones):
                ctx.count("skip_outside_zones", source=s.source_id)
                state.above_since_ns = None
                return events
            if s.score < on:
                state.above_since_ns = None
                return events
            if state.above_since_ns is None:
                state.above_since_ns = now
            if now - state.above_since_ns < p.ns(p.confirm_s):
                ctx.count("skip_confirming", source=s.source_id)
                return events
            episode = state.episode = _Episode(f"{s.source_id}-{time_ordered_id()}", now, now, s.score)
            state.check = None  # an episode's calls check the watch from here on
            events.append(self._event("new", state, s, self._budget(state, now, ctx)))
            return events
        if now - episode.last_update_ns < p.ns(p.update_interval_s):
            return events
        episode.last_update_ns = now
        if s.score < on:
            ctx.count("skip_below_on", source=s.source_id)
            return events
        events.append(self._event("update", state, s, self._budget(state, now, ctx)))
        return events

    def _budget(self, state: _SourceState, now: int, ctx: Context) -> bool:
        """Whether a model call fits the budget now; records it if so."""
        if state.last_call_ns is not None and now - state.last_call_ns < state.p.ns(state.p.cooldown_s):
            ctx.count("skip_cooldown", source=state.source_id)
            return False
        while state.calls and now - state.calls[0] >= 60_000_000_000:
            state.calls.popleft()
        if len(state.calls) >= state.p.max_calls_per_min:
            ctx.count("skip_rate_limit", source=state.source_id)
            return False
        state.calls.append(now)
        state.last_call_ns = now
        ctx.count("model_calls", source=state.source_id)
        return True

    def _event(
        self, kind: str, state: _SourceState, s: Salience, call: bool, reason: str = "", episode: _Episode | None = None
    ) -> Event:
        """An event of ``episode`` (the source's open one unless given: a watch's checks)."""
        episode = episode or state.episode
        assert episode is not None
        return Event(
            s.source_id, self._seq.next(s.source_id, s.wall_ns), s.pts_ns, s.wall_ns, kind,  # type: ignore[arg-type]
            episode.event_id, episode.start_ns, s.pts_ns if kind == "end" else None,
            s.score, episode.peak, dict(s.components), s.regions, call, reason, None, None, s.frame, s.zones, s.objects,
        )  # fmt: skip

    def _end(self, state: _SourceState, s: Salience, reason: str) -> Event:
        event = self._event("end", state, s, False, reason)
        state.episode = None
        state.above_since_ns = None
        return event

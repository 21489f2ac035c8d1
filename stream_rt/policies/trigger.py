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
``max_calls_per_min`` calls (a :class:`~stream_rt.policies.budget.CallBudget` per
source). Every opportunity that is skipped is counted by reason (``confirming``,
``below_on``, ``cooldown``, ``rate_limit``), per source. With ``snapshot``, new, update and
ask events carry a JPEG of their frame. With ``require_zones``, only a step whose
activity touched one of those zones opens an episode (``outside_zones``): a sound alone,
or motion elsewhere, opens none. Events carry the zones and objects of their step. Every
setting can differ per source, and commands change whether a source is enabled and its
thresholds at run time: both are read from the
:class:`~stream_rt.policies.control.EpisodeControls` the trigger is built with.

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

Questions waiting in the :class:`~stream_rt.policies.asks.AskQueue` the trigger is built
with become ``ask`` events at the source's next salience, each with its own event id,
whatever the episode state; when no step comes within ``ask_wait_s`` (a camera that is up
but sends nothing, a source no gate watches), or the source goes offline or ends, they
go out with the source's last frame (none if it never sent one), so every acknowledged
question gets its event. The trigger tells the queue each source's life, so a question
about a source that is offline or ended is refused. With a
:class:`~stream_rt.policies.watches.WatchBook`, an unmet standing watch is re-checked
outside episodes (``check`` events, see :meth:`TriggerPolicy._recheck`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from stream_rt.config import TriggerConfig
from stream_rt.graph.ids import SequenceNumbers, time_ordered_id
from stream_rt.graph.node import Context, Node, describe_error
from stream_rt.graph.packets import EndOfStream, Event, Packet, Salience, SourceStatus, StreamEnded
from stream_rt.media.images import encode_jpeg
from stream_rt.policies.asks import AskQueue
from stream_rt.policies.budget import CallBudget
from stream_rt.policies.control import EpisodeControls
from stream_rt.policies.watches import WatchBook

log = logging.getLogger("stream_rt.trigger")

NO_COMPONENTS = dict.fromkeys(("visual", "speech", "onset", "loudness"), 0.0)


def _ns(seconds: float) -> int:
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
    budget: CallBudget
    above_since_ns: int | None = None
    episode: _Episode | None = None
    online: bool = True  # until the source says otherwise
    last: Salience | None = None
    check: _Episode | None = None  # the watch re-checks under way outside episodes
    last_check_ns: int | None = None


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
        config: TriggerConfig | None = None,
        *,
        controls: EpisodeControls | None = None,
        asks: AskQueue | None = None,
        watches: WatchBook | None = None,
    ) -> None:
        """``config``: the ``[trigger]`` section of every source, or ``controls``: each
        source's own, and what commands change (give one of them); ``asks``: the questions
        to turn into ``ask`` events (none: no model answers questions); ``watches``: the
        standing watches to re-check outside episodes."""
        super().__init__(name)
        if config is not None and controls is not None:
            raise ValueError("give the trigger its config or its controls, not both")
        self.controls = controls if controls is not None else EpisodeControls(config)
        self.asks = asks
        self.watches = watches
        self._states: dict[str, _SourceState] = {}
        self._seq = SequenceNumbers()
        self._waiting: asyncio.Task[None] | None = None
        self._sending = asyncio.Lock()

    def _state(self, source_id: str) -> _SourceState:
        state = self._states.get(source_id)
        if state is None:
            p = self.controls.config(source_id)
            state = self._states[source_id] = _SourceState(CallBudget(p.max_calls_per_min, p.cooldown_s))
        return state

    async def start(self, ctx: Context) -> None:
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
        shortest = min(config.ask_wait_s for config in self.controls.configs())
        while True:
            await ctx.clock.sleep(max(0.05, shortest / 4))
            try:
                await self._send(lambda: self._overdue(ctx), ctx)
            except Exception as exc:  # never let the deadlines stop: acknowledged questions depend on them
                log.error("trigger: cannot send overdue questions: %s", describe_error(exc))

    def _overdue(self, ctx: Context) -> list[Event]:
        assert self.asks is not None
        events = []
        for source_id in self.asks.overdue(ctx.clock.now_ns(), lambda s: _ns(self.controls.config(s).ask_wait_s)):
            ctx.count("asks_without_step", source=source_id)
            events += self._questions(source_id, self._state(source_id).last, ctx)
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
            online = packet.state == "online"
            state.online = online
            if self.asks is not None:
                (self.asks.source_online if online else self.asks.source_offline)(packet.source_id)
            if not online:
                await self._send(lambda: self._close(packet.source_id, state, "source_offline", ctx), ctx)
        elif isinstance(packet, StreamEnded):  # this source ended; others may go on
            state = self._state(packet.source_id)
            if self.asks is not None:
                self.asks.source_ended(packet.source_id)
            await self._send(lambda: self._close(packet.source_id, state, "end_of_stream", ctx), ctx)
        elif isinstance(packet, EndOfStream):
            # The end of stream reaches this node once every upstream source has ended.
            if self.asks is not None:
                self.asks.source_ended()
            await self._send(lambda: self._close_all(ctx), ctx)

    def _close_all(self, ctx: Context) -> list[Event]:
        return [e for sid, st in list(self._states.items()) for e in self._close(sid, st, "end_of_stream", ctx)]

    async def _send(self, make: Callable[[], list[Event]], ctx: Context) -> None:
        """Emit the events ``make()`` returns. The packet loop and the deadlines both send:
        one at a time, so events leave in the order they were made."""
        async with self._sending:
            for event in make():
                if self.controls.config(event.source_id).snapshot and event.type != "end" and event.frame is not None:
                    jpeg = await asyncio.to_thread(encode_jpeg, event.frame)
                    event = dataclasses.replace(event, snapshot_jpeg=jpeg)
                ctx.count(f"events_{event.type}", source=event.source_id)
                await ctx.emit("events", event)

    def _close(self, source_id: str, state: _SourceState, reason: str, ctx: Context) -> list[Event]:
        """A source stopped: its waiting questions go out now, with its last frame, and its
        open episode ends."""
        events = self._questions(source_id, state.last, ctx)
        if state.episode is not None and state.last is not None:
            events.append(self._end(state, state.last, reason))
        state.above_since_ns = None
        return events

    def _questions(self, source_id: str, s: Salience | None, ctx: Context) -> list[Event]:
        """An ``ask`` event for each waiting question, about ``s`` (or, when the source never
        sent anything, about nothing: the model is asked without a picture)."""
        questions = self.asks.take(source_id) if self.asks is not None else []
        if not questions:
            return []
        if s is None:
            s = Salience(source_id, -1, 0, ctx.clock.wall_ns(), 0.0, dict(NO_COMPONENTS))
        events = []
        for q in questions:
            ctx.count("asks", source=source_id)
            events.append(self._event("ask", s, True, "ask", event_id=q.event_id, start_ns=s.pts_ns,
                                      peak=s.score, question=q.question))  # fmt: skip
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
        if watch is None or watch.state != "unmet" or not watch.recheck_s or not self.controls.is_enabled(s.source_id):
            state.check, state.last_check_ns = None, None
            return []
        now = s.pts_ns
        if state.last_check_ns is None:
            state.last_check_ns = now
        asked = max(state.last_check_ns, state.budget.last_call_ns or state.last_check_ns)
        if now - asked < _ns(watch.recheck_s):
            return []
        state.last_check_ns = now
        if state.check is None:
            state.check = _Episode(f"{s.source_id}-{time_ordered_id()}", now, now, s.score)
        ctx.count("watch_checks", source=s.source_id)
        state.check.peak = s.score  # (a check's score is its own)
        return [self._episode_event("check", s, state.check, True, "watch")]

    def _step(self, s: Salience, ctx: Context) -> list[Event]:
        source_id = s.source_id
        state = self._state(source_id)
        state.last = s
        now = s.pts_ns
        events = self._questions(source_id, s, ctx)
        episode = state.episode
        p = self.controls.config(source_id)
        on, off = self.controls.thresholds(source_id)
        if not self.controls.is_enabled(source_id):
            ctx.count("skip_disabled", source=source_id)
            if episode is not None:
                events.append(self._end(state, s, "disabled"))
            return events
        if episode is not None:
            episode.peak = max(episode.peak, s.score)
            if now - episode.start_ns >= _ns(p.max_episode_s):
                events.append(self._end(state, s, "max_duration"))
                episode = None
            elif s.score < off:
                if episode.below_since_ns is None:
                    episode.below_since_ns = now
                if now - episode.below_since_ns >= _ns(p.cutoff_s):
                    events.append(self._end(state, s, "quiet"))
                    return events
            else:
                episode.below_since_ns = None
        if episode is None:
            zones = self.controls.require_zones(source_id)
            if zones and s.score >= on and not set(s.zones) & set(zones):
                ctx.count("skip_outside_zones", source=source_id)
                state.above_since_ns = None
                return events
            if s.score < on:
                state.above_since_ns = None
                return events
            if state.above_since_ns is None:
                state.above_since_ns = now
            if now - state.above_since_ns < _ns(p.confirm_s):
                ctx.count("skip_confirming", source=source_id)
                return events
            episode = state.episode = _Episode(f"{source_id}-{time_ordered_id()}", now, now, s.score)
            state.check = None  # an episode's calls check the watch from here on
            events.append(self._episode_event("new", s, episode, self._spend(state, now, source_id, ctx)))
            return events
        if now - episode.last_update_ns < _ns(p.update_interval_s):
            return events
        episode.last_update_ns = now
        if s.score < on:
            ctx.count("skip_below_on", source=source_id)
            return events
        events.append(self._episode_event("update", s, episode, self._spend(state, now, source_id, ctx)))
        return events

    def _spend(self, state: _SourceState, now: int, source_id: str, ctx: Context) -> bool:
        """Whether a model call fits the source's budget now; spent if so."""
        refused = state.budget.spend(now)
        if refused is not None:
            ctx.count(f"skip_{refused}", source=source_id)
            return False
        ctx.count("model_calls", source=source_id)
        return True

    def _end(self, state: _SourceState, s: Salience, reason: str) -> Event:
        assert state.episode is not None
        event = self._episode_event("end", s, state.episode, False, reason)
        state.episode = None
        state.above_since_ns = None
        return event

    def _episode_event(self, kind: str, s: Salience, episode: _Episode, call: bool, reason: str = "") -> Event:
        """An event of ``episode`` (the source's open one, or a watch's checks)."""
        return self._event(kind, s, call, reason, event_id=episode.event_id, start_ns=episode.start_ns,
                           peak=episode.peak, end_ns=s.pts_ns if kind == "end" else None)  # fmt: skip

    def _event(
        self, kind: str, s: Salience, call: bool, reason: str, *, event_id: str, start_ns: int, peak: float,
        end_ns: int | None = None, question: str | None = None,
    ) -> Event:  # fmt: skip
        """An event about step ``s``: its time, score, components, regions, frame, zones and
        objects."""
        return Event(
            source_id=s.source_id,
            seq=self._seq.next(s.source_id, s.wall_ns),
            pts_ns=s.pts_ns,
            wall_ns=s.wall_ns,
            type=kind,  # type: ignore[arg-type]
            event_id=event_id,
            start_pts_ns=start_ns,
            end_pts_ns=end_ns,
            score=s.score,
            peak_score=peak,
            components=dict(s.components),
            regions=s.regions,
            call_model=call,
            reason=reason,
            question=question,
            frame=s.frame,
            zones=s.zones,
            objects=s.objects,
        )

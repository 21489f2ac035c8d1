"""The MLLM stage: events in, answers out, without ever holding up perception — and every
event that asked for the model gets exactly one answer record, whatever fails.

For each event that calls the model (``call_model``: ``new`` / ``update`` within the
trigger's budget, and every ``ask``), and for each :class:`MllmRequest` sent to it
directly, the stage:

1. builds the request (keyframe, region crop, question, context) off the event loop; an
   event without a picture (an audio-only source) is asked about in words alone;
2. **reuses** the last answer when the scene and question have not changed
   (:class:`~stream_rt.policies.answer_reuse.AnswerReuse`; status ``reused``, no call);
3. **limits the flow, fairly across sources** (:class:`~stream_rt.policies.flow.FairFlow`):
   up to ``max_in_flight`` calls at once, the next taken round-robin by source; each
   source's routine requests keep one waiting place of their own, and with
   ``flow="latest"`` (live) a newer one replaces that source's waiting one, which is
   answered ``dropped`` (a busy camera never replaces a quiet one's); questions someone
   asked (``ask`` events) go before routine requests and are never replaced (the trigger
   bounds how many are open); with ``calls_per_minute``, a routine request that would
   start beyond that many calls in the last minute, across sources, is answered
   ``dropped``; with ``flow="block"`` (replays) a newer request waits for room instead,
   slowing the graph to the model;
4. calls the backend with a **timeout**: a call past ``timeout_s`` is answered ``timeout``
   at once. The model works on a thread of its own (:class:`~stream_rt.mllm.backend.Backend`),
   so a call that hangs there cannot take perception's threads; while that thread is still
   busy with a call given up on, the backend is **stuck**: requests are answered ``error``
   at once, and :meth:`MllmStage.health` says so until it returns.

Any exception on the way (building, reuse, the call, the memory) answers that request
``error`` and the next goes ahead: the call task cannot die. When the stage stops (or is
restarted by its supervision) with requests still waiting, each is answered ``dropped``.

With a :class:`~stream_rt.mllm.clips.ClipBuffer`, requests are clips: the frames sampled
before the event (from the ``video`` input) with the audio features of that span (from
``audio``). With a :class:`~stream_rt.memory.StreamingMemory`, each call carries the
source's memory (the transformers backend puts it before the prompt and reuses its KV
cache while it is unchanged), and each answered call becomes a memory entry: the
keyframe's pooled visual tokens with the answer's summary. The memory is restored from
``memory_snapshot`` at start, written there every ``snapshot_interval_s`` and at stop.

``process()`` returns as soon as the request is queued, so a slow model delays only
answers. At the end of a stream the stage finishes what is queued before it passes the
end on, so a replay's answers all reach the sinks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Literal

from stream_rt.graph.histogram import Histogram
from stream_rt.graph.node import Context, Node, describe_error
from stream_rt.graph.packets import (
    AnswerStatus,
    AudioFeatures,
    EndOfStream,
    Event,
    MllmAnswer,
    MllmRequest,
    Packet,
    VideoFrame,
    WatchState,
)
from stream_rt.memory.streaming import MemoryEntry, StreamingMemory
from stream_rt.mllm.backend import Backend, ModelUnavailable
from stream_rt.mllm.clips import ClipBuffer
from stream_rt.mllm.prompt import DEFAULT_QUESTION
from stream_rt.mllm.requests import build_request
from stream_rt.policies.answer_reuse import AnswerReuse
from stream_rt.policies.asks import AskLedger
from stream_rt.policies.flow import FairFlow
from stream_rt.policies.watches import WatchBook

log = logging.getLogger("stream_rt.mllm")

WATCH_TICK_S = 0.5

STUCK_GRACE_S = 1.0
"""How long a call waits for the model's thread to finish a call given up on before it is
answered ``error`` (the thread is stuck)."""

FAILING_AFTER = 3
"""This many calls in a row that ended ``error`` or ``timeout`` make the stage unhealthy."""


@dataclasses.dataclass(eq=False)  # the flow finds it by identity
class _Queued:
    request: MllmRequest
    queued_at: float  # time.perf_counter()
    answered: bool = False  # its answer is on its way out


class MllmStage(Node):
    """Events (``events``) and ready requests (``requests``) in, one :class:`MllmAnswer` per
    event that calls the model out on ``answers`` (and watch transitions on ``watches``),
    whatever fails; ``video`` / ``audio`` feed clips. Calls run on the ``backend``'s own
    executor, limited fairly across sources, so perception is never held up (see the module
    docstring for reuse, flow, timeouts and memory)."""

    inputs = {"events": (Event,), "requests": (MllmRequest,), "video": (VideoFrame,), "audio": (AudioFeatures,)}
    outputs = {"answers": (MllmAnswer,), "watches": (WatchState,)}

    def __init__(
        self,
        name: str,
        backend: Backend,
        *,
        question: str = DEFAULT_QUESTION,
        timeout_s: float = 60.0,
        max_side: int = 768,
        crop_regions: bool = True,
        reuse_threshold: float = 0.02,
        reuse_max_age_s: float = 120.0,
        flow: Literal["latest", "block"] = "latest",
        clip: ClipBuffer | None = None,
        memory: StreamingMemory | None = None,
        memory_snapshot: Path | None = None,
        memory_refresh: str = "episode",
        snapshot_interval_s: float = 60.0,
        asks: AskLedger | None = None,
        questions: dict[str, str] | None = None,
        max_in_flight: int = 1,
        calls_per_minute: int = 0,
        watches: WatchBook | None = None,
    ) -> None:
        """``questions``: the question of each source that has its own (``question`` for the
        rest); ``calls_per_minute``: the budget of routine calls across sources (0: none);
        ``watches``: standing conditions asked with each routine call of their source, whose
        transitions the stage publishes on ``watches``."""
        super().__init__(name)
        self.backend = backend
        self.question = question
        self.questions = dict(questions or {})
        self.timeout_s = timeout_s
        self.max_side = max_side
        self.crop_regions = crop_regions
        self.reuse = AnswerReuse(reuse_threshold, reuse_max_age_s)
        self.flow: FairFlow[_Queued] = FairFlow(max_in_flight, calls_per_minute)
        self.calls_per_minute = calls_per_minute
        self.block = flow == "block"
        self.clip = clip
        self.memory = memory
        self.memory_snapshot = memory_snapshot
        self.memory_refresh = memory_refresh
        self._episode_memory: dict[str, tuple[str, tuple[MemoryEntry, ...]]] = {}  # source -> (event id, entries)
        self.snapshot_interval_s = snapshot_interval_s
        self.asks = asks
        self.watches = watches
        self._last_said: dict[str, tuple[str, dict[str, object]]] = {}  # per source: its last answer's say
        self._watch_clock: asyncio.Task[None] | None = None
        self.failures_in_a_row = 0  # calls that ended error or timeout, since the last that did not
        self._saved_at = time.monotonic()
        self._room = asyncio.Event()  # set whenever nothing waits
        self._calls: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.call_latency = Histogram("seconds a model call took, of the calls that answered")
        self.answer_latency = Histogram("seconds from an event to its answer record (any status)")
        self._idle = asyncio.Event()
        self._idle.set()
        self._taking: MllmRequest | None = None  # taken in, neither answered nor queued yet
        self._interrupted: list[MllmRequest] = []  # ...when the stage was stopped
        self._held: list[Event] = []  # events whose clip frames are still on the video edge

    async def start(self, ctx: Context) -> None:
        """Load the backend. A model that cannot be used (missing weights, a model
        transformers cannot load, a technique it does not support) stops the graph: a
        configuration to fix. Any other failure is logged and each call then reports it,
        while perception goes on."""
        self._stopping = False
        try:
            await self.backend.start()
        except ModelUnavailable:
            raise
        except Exception as exc:
            log.error("MLLM backend '%s' cannot start: %s", self.backend.name, describe_error(exc))
            ctx.count("backend_start_errors")
        if self.watches is not None:
            self._watch_clock = asyncio.create_task(self._tick_watches(ctx))
        if self.memory is not None and self.memory_snapshot is not None and self.memory_snapshot.exists():
            await asyncio.to_thread(self._restore_memory, self.memory, self.memory_snapshot)

    def _restore_memory(self, memory: StreamingMemory, path: Path) -> None:
        """Load the snapshot; an unreadable one is set aside (never overwritten: if it
        cannot be moved, no snapshot is saved) and the memory starts empty."""
        try:
            memory.load(path)
            log.info("memory restored from %s: %d entries", path, sum(len(memory.entries(s)) for s in memory.sources))
            return
        except Exception as exc:
            problem = describe_error(exc)
        aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            path.rename(aside)
            kept = f"kept it as {aside}"
        except OSError as exc:
            self.memory_snapshot = None
            kept = f"cannot move it aside ({exc.strerror}), so no snapshot will be saved"
        log.error("cannot restore the memory from %s (%s); %s; starting empty", path, problem, kept)

    def _save_memory(self, memory: StreamingMemory, path: Path) -> None:
        try:
            memory.save(path)
        except Exception as exc:
            log.error("cannot write the memory snapshot %s: %s", path, describe_error(exc))

    async def process(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, VideoFrame):
            if self.clip is not None:
                self.clip.add_frame(packet)
                await self._release(ctx, lambda e: e.source_id == packet.source_id and e.pts_ns <= packet.pts_ns)
            return
        if isinstance(packet, AudioFeatures):
            if self.clip is not None:
                self.clip.add_audio(packet)
            return
        if isinstance(packet, Event):
            if not packet.call_model:
                return
            if self._clip_behind(packet):
                self._held.append(packet)
                return
        assert isinstance(packet, Event | MllmRequest)
        await self._take_in(packet, ctx)

    def _clip_behind(self, event: Event) -> bool:
        """Whether ``event``'s clip would miss frames: the event and the video reach the
        stage on two edges, taken in turn, so a backlog of video (while a call blocks) lets
        an event overtake the frames before it. Such an event waits for a frame of its own
        time (its own frame is on the video edge already, or a newer one replaced it), or
        the end of its video; an event of its source already waiting keeps the order. A
        source none of whose video reached the stage has no clip to wait for."""
        if self.clip is None or event.frame is None:
            return False
        if any(held.source_id == event.source_id for held in self._held):
            return True
        latest = self.clip.latest_pts(event.source_id)
        return latest is not None and latest < event.pts_ns

    async def _release(self, ctx: Context, ready: Callable[[Event], bool]) -> None:
        while self._held:
            first: dict[str, Event] = {}  # per source, its oldest waiting event: only that one may go
            for held in self._held:
                first.setdefault(held.source_id, held)
            going = next((e for e in first.values() if ready(e)), None)
            if going is None:
                return
            self._held.remove(going)
            await self._take_in(going, ctx)

    async def _take_in(self, packet: Event | MllmRequest, ctx: Context) -> None:
        taken = _bare_request(packet, self.question_for(packet.source_id)) if isinstance(packet, Event) else packet
        self._taking = taken
        try:
            await self._take(packet, taken, ctx)
        except asyncio.CancelledError:  # stopped while building or waiting: it is still owed its answer
            if self._taking is not None:
                self._interrupted.append(self._taking)
            raise
        finally:
            self._taking = None

    async def _take(self, packet: Event | MllmRequest, taken: MllmRequest, ctx: Context) -> None:
        """Build, reuse or queue one request: every path ends in one answer or in the queue
        (``self._taking`` is cleared the moment it does)."""
        if ctx.stopping.is_set():  # draining: nothing new is asked, but everything is answered
            await self._settle(_failed(taken, "dropped", "the daemon is stopping"), ctx, taken)
            return
        request, ask = taken, False
        if isinstance(packet, Event):
            try:
                request = await asyncio.to_thread(self._request_for, packet)
            except Exception as exc:
                log.warning("cannot build a request for %s: %s", packet.event_id, describe_error(exc))
                ctx.count("request_errors", source=packet.source_id)
                await self._settle(_failed(taken, "error", describe_error(exc)), ctx, taken)
                return
            ask = packet.type == "ask"
        ctx.count("requests", source=request.source_id)
        try:
            reused = self.reuse.lookup(request.source_id, request.question, request.signature, request.pts_ns)
        except Exception as exc:
            log.warning("answer reuse failed for %s: %s", request.event_id, describe_error(exc))
            reused = None
        if reused is not None:
            await self._settle(_reused(request, reused), ctx, request)
            return
        while self.block and self.flow.queued and not ctx.stopping.is_set():
            self._room.clear()
            await _first(self._room.wait(), ctx.stopping.wait())
        if ctx.stopping.is_set() and self.block and self.flow.queued:
            await self._settle(_failed(request, "dropped", "the daemon is stopping"), ctx, request)
            return
        self._taking = None
        self._idle.clear()
        started, replaced, refused = self.flow.offer(request.source_id, _Queued(request, time.perf_counter()), ask)
        if replaced is not None:
            ctx.count("requests_replaced", source=replaced.request.source_id)
            why = "replaced by a newer request of its source while waiting"
            await self._answer(_failed(replaced.request, "dropped", why), ctx, replaced.request)
        await self._start(started, refused, ctx)

    async def _start(self, started: list[_Queued], refused: list[_Queued], ctx: Context) -> None:
        """Call for each ``started`` item on a task of its own; answer each one the budget
        ``refused``."""
        if self._stopping:
            return  # what was started stays in the flow: stop() answers it
        for item in started:
            task = asyncio.create_task(self._work(item, ctx), name=f"stream_rt:{self.name}:call")
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
        for item in refused:
            ctx.count("requests_over_budget", source=item.request.source_id)
            why = f"over the budget of {self.calls_per_minute} model calls a minute across sources"
            await self._answer(_failed(item.request, "dropped", why), ctx, item.request)
        if self.flow.in_flight or self.flow.queued:
            return
        self._room.set()
        self._idle.set()

    def question_for(self, source_id: str) -> str:
        """The question asked about ``source_id``'s events (its own, else the stage's), with
        its standing watch's condition if it has one."""
        question = self.questions.get(source_id, self.question)
        return self.watches.question(source_id, question) if self.watches is not None else question

    async def _tick_watches(self, ctx: Context) -> None:
        """Expire watches and publish what commands and the clock changed, twice a second."""
        assert self.watches is not None
        while True:
            try:
                self.watches.expire()
            except Exception as exc:  # a watch restored with bad values: said, and the clock goes on
                log.error("watches: cannot expire: %s", describe_error(exc))
            await self._publish_watches(ctx)
            await asyncio.sleep(WATCH_TICK_S)

    async def _publish_watches(self, ctx: Context) -> None:
        if self.watches is not None:
            for transition in self.watches.take():
                ctx.count(f"watch_{transition.state}", source=transition.source_id)
                await ctx.emit("watches", transition)

    def _request_for(self, event: Event) -> MllmRequest:
        question = self.question_for(event.source_id)
        if self.clip is not None and event.frame is not None:
            return self.clip.request(event, question, self.max_side)
        return build_request(event, question, max_side=self.max_side, crop_regions=self.crop_regions)

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, EndOfStream) and ctx.port == "video":  # no more frames come for them
            await self._release(ctx, lambda e: e.source_id == packet.source_id)
        if isinstance(packet, EndOfStream) and ctx.port in ("events", "requests"):
            await self._idle.wait()  # what asked is answered before the end goes on

    async def stop(self, ctx: Context) -> None:
        self._stopping = True  # nothing new starts from here on
        if self._watch_clock is not None:
            self._watch_clock.cancel()
            await asyncio.gather(self._watch_clock, return_exceptions=True)
            self._watch_clock = None
            await self._publish_watches(ctx)  # what a command changed just before the stop
        while tasks := [task for task in self._calls if not task.done()]:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._calls.clear()
        owed = [item.request for item in self.flow.clear() if not item.answered] + self._interrupted
        owed += [_bare_request(event, self.question_for(event.source_id)) for event in self._held]
        self._interrupted, self._held = [], []
        for request in owed:  # promised an answer, never called
            await self._answer(_failed(request, "dropped", "the stage stopped before the model answered"), ctx, request)
        self._room.set()
        self._idle.set()
        await self.backend.close()
        if self.memory is not None and self.memory_snapshot is not None:
            await asyncio.to_thread(self._save_memory, self.memory, self.memory_snapshot)

    def stuck_s(self) -> float | None:
        """How long the model's thread has been busy with a call that was given up on (timed
        out), or ``None`` when it is not stuck."""
        since = self.backend.busy_since
        if since is None:
            return None
        busy = time.monotonic() - since
        return busy if busy > self.timeout_s else None

    def health(self, now_ns: int = 0, grace_ns: int = 0) -> str | None:
        """``None`` while the model answers; else one line saying what is wrong (the stuck
        and failing rules have their own thresholds, so the grace is not used)."""
        stuck = self.stuck_s()
        if stuck is not None:
            return f"{self.name} (the model has been stuck in one call for {stuck:.0f} s)"
        if self.failures_in_a_row >= FAILING_AFTER:
            return f"{self.name} (the last {self.failures_in_a_row} model calls failed)"
        return None

    def gauges(self, now_ns: int) -> dict[str, float]:
        gauges = {"in_flight": float(len(self.flow.in_flight)), "waiting": float(self.flow.queued),
                  "stuck_s": round(self.stuck_s() or 0.0, 1)}  # fmt: skip
        gauges.update(self.backend.gauges())
        if self.memory is not None:
            entries = [e for source in self.memory.sources for e in self.memory.entries(source)]
            gauges["memory_entries"] = float(len(entries))
            gauges["memory_visual_tokens"] = float(sum(e.visual.shape[0] for e in entries))
        return gauges

    def histograms(self) -> dict[str, Histogram]:
        return {"model_call_seconds": self.call_latency, "event_answer_seconds": self.answer_latency}

    async def _settle(self, answer: MllmAnswer, ctx: Context, request: MllmRequest) -> None:
        """The answer to the request being taken in: it is no longer owed."""
        self._taking = None
        await self._answer(answer, ctx, request)

    async def _answer(self, answer: MllmAnswer, ctx: Context, request: MllmRequest) -> None:
        """Send one answer record (to ``request``): the only way answers leave the stage."""
        if request.wall_ns:
            self.answer_latency.observe(max(0.0, (time.time_ns() - request.wall_ns) / 1e9))
        ctx.count(f"answers_{answer.status}", source=answer.source_id)
        for kind, n in answer.tokens.items():
            ctx.count(f"tokens_{kind}", n, source=answer.source_id)
        if self.asks is not None:
            self.asks.release(answer.source_id, answer.event_id)
        answer = self._marked_if_repeated(answer)
        if answer.repeat:
            ctx.count("answers_repeated", source=answer.source_id)
        await ctx.emit("answers", answer)
        if self.watches is not None:
            self.watches.observe(answer)
            await self._publish_watches(ctx)

    def _marked_if_repeated(self, answer: MllmAnswer) -> MllmAnswer:
        """``answer``, marked ``repeat`` when it says what the source's last answer said in
        the same episode (its ``confidence`` aside)."""
        if answer.status not in ("ok", "reused") or answer.answer is None:
            return answer
        said = (answer.event_id, {k: v for k, v in answer.answer.items() if k != "confidence"})
        last, self._last_said[answer.source_id] = self._last_said.get(answer.source_id), said
        return dataclasses.replace(answer, repeat=True) if last == said else answer

    async def _work(self, item: _Queued, ctx: Context) -> None:
        """Answer ``item``, then start what the flow lets start. Nothing but cancellation
        ends it early."""
        try:
            try:
                answer = await self._call(item, ctx)
            except Exception as exc:
                log.error("MLLM stage failed on %s: %s", item.request.event_id, describe_error(exc))
                answer = _failed(item.request, "error", describe_error(exc), self.backend)
            await self._answer(answer, ctx, item.request)
            item.answered = True  # from here on it is not answered again, even if stopped mid-way
        finally:
            if not self._stopping:  # (stopping: the item stays in the flow, answered there if owed)
                started, refused = self.flow.done(item)
                self._room.set()
                await self._start(started, refused, ctx)

    async def _call(self, item: _Queued, ctx: Context) -> MllmAnswer:
        request = item.request
        if self.memory is not None:
            request = dataclasses.replace(request, memory=self._memory_for(request), summary_tokens=self.memory.tokens)
        busy = await self._busy_after(STUCK_GRACE_S)
        if busy is not None:
            ctx.count("refused_stuck", source=request.source_id)
            return _failed(request, "error", f"the model is still busy with a call given up on {busy:.0f} s ago")
        started = time.perf_counter()
        try:
            answer = await asyncio.wait_for(self.backend.answer(request), self.timeout_s)
        except TimeoutError:
            log.warning("MLLM call for %s timed out after %.0f s", request.event_id, self.timeout_s)
            answer = _failed(request, "timeout", f"no answer within {self.timeout_s:g} s", self.backend, started)
        except Exception as exc:
            log.warning("MLLM call for %s failed: %s", request.event_id, describe_error(exc))
            answer = _failed(request, "error", describe_error(exc), self.backend, started)
        else:
            ctx.count("model_calls", source=request.source_id)
            self.call_latency.observe(time.perf_counter() - started)
        self.failures_in_a_row = self.failures_in_a_row + 1 if answer.status in ("error", "timeout") else 0
        queued = max(0.0, time.perf_counter() - item.queued_at - answer.timings.get("total", 0.0))
        answer = dataclasses.replace(answer, timings={**answer.timings, "queued": queued})
        ctx.count("call_ms", round(1000 * answer.timings.get("total", 0.0)), source=request.source_id)
        ctx.counters.update(self.backend.counters())
        try:
            self.reuse.remember(request.source_id, request.question, request.signature, request.pts_ns, answer)
            await self._remember(answer, request, ctx)
        except Exception as exc:  # the answer stands; what is kept of it for later is lost
            log.error("cannot keep the answer to %s for later calls: %s", request.event_id, describe_error(exc))
            ctx.count("memory_errors")
        return answer

    def _memory_for(self, request: MllmRequest) -> tuple[MemoryEntry, ...]:
        """The memory ``request`` sees: the latest, or (``memory_refresh = "episode"``) the
        memory as its episode began, so that the prefix's K/V and token reuse carry
        through the episode."""
        assert self.memory is not None
        if self.memory_refresh == "call":
            return tuple(self.memory.entries(request.source_id))
        kept = self._episode_memory.get(request.source_id)
        if kept is None or kept[0] != request.event_id:
            kept = (request.event_id, tuple(self.memory.entries(request.source_id)))
            self._episode_memory[request.source_id] = kept
        return kept[1]

    async def _busy_after(self, grace_s: float) -> float | None:
        """Wait up to ``grace_s`` for the model's thread to be free (a call given up on stops
        at its next token); ``None`` once it is, else how long it has been busy."""
        deadline = time.monotonic() + grace_s
        while (since := self.backend.busy_since) is not None:
            if time.monotonic() >= deadline:
                return time.monotonic() - since
            await asyncio.sleep(0.02)
        return None

    async def _remember(self, answer: MllmAnswer, request: MllmRequest, ctx: Context) -> None:
        """A call's keyframe tokens become a memory entry, with the answer's summary when the
        answer kept the contract (the tokens are worth keeping either way)."""
        memory = self.memory
        if memory is None or answer.visual_summary is None:
            return
        summary = (answer.answer or {}).get("summary", "") if answer.status == "ok" else ""
        merges = memory.counters["merges"]
        start = request.frame_pts[0] if request.frame_pts else request.pts_ns
        await asyncio.to_thread(
            memory.add, request.source_id, start, request.pts_ns, answer.visual_summary, str(summary),
            [request.event_id],
        )  # fmt: skip
        ctx.count("memory_added")
        ctx.count("memory_merges", memory.counters["merges"] - merges)
        if self.memory_snapshot is not None and time.monotonic() - self._saved_at >= self.snapshot_interval_s:
            self._saved_at = time.monotonic()
            await asyncio.to_thread(self._save_memory, memory, self.memory_snapshot)


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of ``waits`` is done; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _bare_request(event: Event, question: str) -> MllmRequest:
    """What an event asked, without its pictures (to answer it when building failed)."""
    return MllmRequest(event.source_id, event.seq, event.pts_ns, event.wall_ns, event.event_id,
                       event.question or question)  # fmt: skip


def _reused(request: MllmRequest, answer: MllmAnswer) -> MllmAnswer:
    """``answer`` given again, for ``request``."""
    return dataclasses.replace(
        answer, source_id=request.source_id, seq=request.seq, pts_ns=request.pts_ns, wall_ns=time.time_ns(),
        event_id=request.event_id, status="reused", timings={}, tokens={},
    )  # fmt: skip


def _failed(
    request: MllmRequest, status: AnswerStatus, error: str, backend: Backend | None = None, started: float | None = None
) -> MllmAnswer:
    timings = {"total": time.perf_counter() - started} if started is not None else {}
    return MllmAnswer(
        request.source_id, request.seq, request.pts_ns, time.time_ns(), request.event_id, request.question,
        status, None, "", backend.name if backend else "", bool(backend and backend.smoke), error, "", timings,
        frame_pts=request.frame_pts,
    )  # fmt: skip

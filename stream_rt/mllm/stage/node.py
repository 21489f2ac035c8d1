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

With ``clip.frames`` > 1 (a :class:`~stream_rt.mllm.stage.clips.ClipBuffer`), requests are
clips: the frames sampled before the event (from the ``video`` input) with the audio
features of that span (from ``audio``) and, with ``clip.sound``, its sound (from ``sound``)
for a model that hears it. With ``memory.enabled`` (a
:class:`~stream_rt.memory.StreamingMemory`), each call carries the source's memory (the
transformers backend puts it before the prompt and reuses its KV cache while it is
unchanged), and each answered call becomes a memory entry: the keyframe's pooled visual
tokens with the answer's summary. The memory is restored from ``memory.snapshot`` at start,
written there every ``memory.snapshot_interval_s`` and at stop.

The stage reads time only through the graph's clock (``ctx.clock``), and composes one part
per concern (see :mod:`stream_rt.mllm.stage`).

``process()`` returns as soon as the request is queued, so a slow model delays only
answers. At the end of a stream the stage finishes what is queued before it passes the
end on, so a replay's answers all reach the sinks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from stream_rt.config import MllmConfig
from stream_rt.graph.histogram import Histogram
from stream_rt.graph.node import Context, Node, describe_error
from stream_rt.graph.packets import (
    AnswerStatus,
    AudioChunk,
    AudioFeatures,
    EndOfStream,
    Event,
    MllmAnswer,
    MllmRequest,
    Packet,
    VideoFrame,
    WatchState,
)
from stream_rt.mllm.backend import Backend, ModelUnavailable
from stream_rt.mllm.prompt import DEFAULT_QUESTION
from stream_rt.mllm.stage.answers import Repeats, failed, reused
from stream_rt.mllm.stage.clips import ClipBuffer, OvertakenEvents
from stream_rt.mllm.stage.graph_clock import GraphClock
from stream_rt.mllm.stage.intake import Intake
from stream_rt.mllm.stage.memory_keeping import MemoryKeeper
from stream_rt.mllm.stage.scheduling import CallScheduler, Queued
from stream_rt.mllm.stage.stuck import ModelHealth
from stream_rt.mllm.stage.watch_ticker import WatchTicker
from stream_rt.mllm.stage.words import AwaitingWords
from stream_rt.policies.answer_reuse import AnswerReuse
from stream_rt.policies.asks import AskLedger
from stream_rt.policies.flow import FairFlow
from stream_rt.policies.watches import WatchBook

log = logging.getLogger("stream_rt.mllm")

STUCK_GRACE_S = 1.0
"""How long a call waits for the model's thread to finish a call given up on before it is
answered ``error`` (the thread is stuck)."""


class MllmStage(Node):
    """Events (``events``) and ready requests (``requests``) in, one :class:`MllmAnswer` per
    event that calls the model out on ``answers`` (and watch transitions on ``watches``),
    whatever fails; ``video`` / ``audio`` feed clips (and ``sound``, the sources' audio, their
    sound for a model that hears); ``heard`` brings back the events of the
    sources named in :meth:`expect_words` with the words of their span, which their requests
    wait for (:mod:`~stream_rt.mllm.stage.words`). Calls run on the ``backend``'s own
    executor, limited fairly across sources, so perception is never held up (see the package
    docstring for reuse, flow, timeouts and memory)."""

    inputs = {
        "events": (Event,), "requests": (MllmRequest,), "video": (VideoFrame,), "audio": (AudioFeatures,),
        "sound": (AudioChunk,), "heard": (Event,),
    }  # fmt: skip
    outputs = {"answers": (MllmAnswer,), "watches": (WatchState,)}

    def __init__(
        self,
        name: str,
        backend: Backend,
        config: MllmConfig | None = None,
        *,
        questions: dict[str, str] | None = None,
        asks: AskLedger | None = None,
        watches: WatchBook | None = None,
    ) -> None:
        """``config``: the ``[mllm]`` section (the stage reads its question, timeout, images,
        reuse, flow, clip and memory settings; ``backend`` is built from the rest);
        ``questions``: the question of each source that has its own; ``asks``: the ledger
        of open questions, each released when answered; ``watches``: standing conditions
        asked with each routine call of their source, whose transitions the stage publishes
        on ``watches``."""
        super().__init__(name)
        cfg = config or MllmConfig()
        self.backend = backend
        self.timeout_s = cfg.timeout_s
        self.clock = GraphClock()  # the graph's, from start()
        clip = ClipBuffer(cfg.clip.frames, cfg.clip.interval_s, cfg.clip.sound) if cfg.clip.frames > 1 else None
        self.overtaken = OvertakenEvents(clip) if clip is not None else None
        self.clip = clip
        self.intake = Intake(cfg.question or DEFAULT_QUESTION, questions or {}, watches, cfg.max_image_side,
                             cfg.crop_regions, clip)  # fmt: skip
        self.reuse = AnswerReuse(cfg.reuse_threshold, cfg.reuse_max_age_s)
        self.calls = CallScheduler(cfg.in_flight, cfg.calls_per_minute, cfg.flow == "block", self.clock)
        self.model = ModelHealth(backend, cfg.timeout_s, self.clock)
        self.memory = MemoryKeeper(cfg.memory, self.clock) if cfg.memory.enabled else None
        self.asks = asks
        self.watches = watches
        self.watch_ticker = WatchTicker(watches, self.clock) if watches is not None else None
        self.repeats = Repeats()
        self.call_latency = Histogram("seconds a model call took, of the calls that answered")
        self.answer_latency = Histogram("seconds from an event to its answer record (any status)")
        self.awaiting_words = AwaitingWords()
        self._taking: MllmRequest | None = None  # taken in, neither answered nor queued yet
        self._interrupted: list[MllmRequest] = []  # ...when the stage was stopped

    def expect_words(self, source_id: str) -> None:
        """``source_id`` is transcribed: its ``update`` and ``end`` events come back on
        ``heard`` with their words, and their requests wait for them."""
        self.awaiting_words.sources.add(source_id)

    @property
    def flow(self) -> FairFlow[Queued]:
        """The calls in flight and waiting."""
        return self.calls.flow

    @property
    def _calls(self) -> set[asyncio.Task[None]]:
        return self.calls.tasks

    async def start(self, ctx: Context) -> None:
        """Load the backend. A model that cannot be used (missing weights, a model
        transformers cannot load, a technique it does not support) stops the graph: a
        configuration to fix. Any other failure is logged and each call then reports it,
        while perception goes on."""
        self.clock.use(ctx.clock)
        self.calls.begin()
        try:
            await self.backend.start()
        except ModelUnavailable:
            raise
        except Exception as exc:
            log.error("MLLM backend '%s' cannot start: %s", self.backend.name, describe_error(exc))
            ctx.count("backend_start_errors")
        self.awaiting_words = AwaitingWords(self.awaiting_words.sources)  # a restart waits afresh
        if self.watch_ticker is not None:
            self.watch_ticker.start(ctx)
        if self.memory is not None:
            await self.memory.restore()

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
        if isinstance(packet, AudioChunk):
            if self.clip is not None:
                self.clip.add_sound(packet)
            return
        if isinstance(packet, Event) and ctx.port == "heard":
            if (request := self.awaiting_words.heard(packet)) is not None:
                await self._take_in(request, ctx)  # taken in again, its words with it
            return
        if isinstance(packet, Event):
            if not packet.call_model:
                return
            if self.overtaken is not None and self.overtaken.overtook(packet):
                self.overtaken.hold(packet)
                return
        assert isinstance(packet, Event | MllmRequest)
        await self._take_in(packet, ctx)

    async def _release(self, ctx: Context, ready: Callable[[Event], bool]) -> None:
        """Take in the held events that are ``ready``, in order."""
        while self.overtaken is not None and (going := self.overtaken.next_ready(ready)) is not None:
            await self._take_in(going, ctx)

    async def _take_in(self, packet: Event | MllmRequest, ctx: Context) -> None:
        taken = self.intake.bare(packet) if isinstance(packet, Event) else packet
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
            await self._settle(self._failed(taken, "dropped", "the daemon is stopping"), ctx, taken)
            return
        request, ask = taken, False
        if isinstance(packet, Event):
            try:
                request = await asyncio.to_thread(self.intake.request_for, packet)
            except Exception as exc:
                log.warning("cannot build a request for %s: %s", packet.event_id, describe_error(exc))
                ctx.count("request_errors", source=packet.source_id)
                await self._settle(self._failed(taken, "error", describe_error(exc)), ctx, taken)
                return
            ask = packet.type == "ask"
            if self.awaiting_words.waits(packet):
                ready = self.awaiting_words.hold(packet, request)
                if ready is None:
                    self._taking = None  # held: owed its answer by the words' wait (or the stop)
                    return
                request = ready
        ctx.count("requests", source=request.source_id)
        try:
            again = self.reuse.lookup(request.source_id, request.question, request.signature, request.pts_ns)
        except Exception as exc:
            log.warning("answer reuse failed for %s: %s", request.event_id, describe_error(exc))
            again = None
        if again is not None:
            await self._settle(reused(request, again, self.clock.wall_ns()), ctx, request)
            return
        if not await self.calls.room(ctx.stopping):
            await self._settle(self._failed(request, "dropped", "the daemon is stopping"), ctx, request)
            return
        self._taking = None
        started, replaced, refused = self.calls.offer(request, ask)
        if replaced is not None:
            ctx.count("requests_replaced", source=replaced.request.source_id)
            why = "replaced by a newer request of its source while waiting"
            await self._answer(self._failed(replaced.request, "dropped", why), ctx, replaced.request)
        await self._start(started, refused, ctx)

    async def _start(self, started: list[Queued], refused: list[Queued], ctx: Context) -> None:
        """Call for each ``started`` item on a task of its own; answer each one the budget
        ``refused``."""
        if self.calls.stopping:
            return  # what was started stays in the flow: stop() answers it
        self.calls.launch(started, lambda item: self._work(item, ctx), f"stream_rt:{self.name}:call")
        for item in refused:
            ctx.count("requests_over_budget", source=item.request.source_id)
            why = f"over the budget of {self.calls.calls_per_minute} model calls a minute across sources"
            await self._answer(self._failed(item.request, "dropped", why), ctx, item.request)
        self.calls.settle()

    def question_for(self, source_id: str) -> str:
        """The question asked about ``source_id``'s events (its own, else the stage's), with
        its standing watch's condition if it has one."""
        return self.intake.question_for(source_id)

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, EndOfStream) and ctx.port == "video":  # no more frames come for them
            await self._release(ctx, lambda e: e.source_id == packet.source_id)
        if isinstance(packet, EndOfStream) and ctx.port == "heard":  # no words come any more: ask without
            for request in self.awaiting_words.close():
                await self._take_in(request, ctx)
        if isinstance(packet, EndOfStream) and ctx.port in ("events", "requests", "heard"):
            await self.calls.idle.wait()  # what asked is answered before the end goes on

    async def stop(self, ctx: Context) -> None:
        self.calls.stopping = True  # nothing new starts from here on
        if self.watch_ticker is not None:
            await self.watch_ticker.stop(ctx)
        owed = await self.calls.stop() + self._interrupted + self.awaiting_words.close()
        owed += [self.intake.bare(event) for event in (self.overtaken.take_all() if self.overtaken else [])]
        self._interrupted = []
        for request in owed:  # promised an answer, never called
            await self._answer(self._failed(request, "dropped", "the stage stopped before the model answered"), ctx,
                               request)  # fmt: skip
        self.calls.release()
        await self.backend.close()
        if self.memory is not None:
            await self.memory.save()

    @property
    def failures_in_a_row(self) -> int:
        """Calls that ended ``error`` or ``timeout``, since the last that did not."""
        return self.model.failures_in_a_row

    def stuck_s(self) -> float | None:
        """How long the model's thread has been busy with a call that was given up on (timed
        out), or ``None`` when it is not stuck."""
        return self.model.stuck_s()

    def health(self, now_ns: int = 0, grace_ns: int = 0) -> str | None:
        """``None`` while the model answers; else one line saying what is wrong (the stuck
        and failing rules have their own thresholds, so the grace is not used)."""
        return self.model.problem(self.name)

    def gauges(self, now_ns: int) -> dict[str, float]:
        gauges = {"in_flight": float(len(self.flow.in_flight)), "waiting": float(self.flow.queued),
                  "stuck_s": round(self.stuck_s() or 0.0, 1)}  # fmt: skip
        gauges.update(self.backend.gauges())
        if self.memory is not None:
            gauges.update(self.memory.gauges())
        return gauges

    def histograms(self) -> dict[str, Histogram]:
        return {"model_call_seconds": self.call_latency, "event_answer_seconds": self.answer_latency}

    def _failed(self, request: MllmRequest, status: AnswerStatus, error: str) -> MllmAnswer:
        """``request`` answered ``status`` without a call."""
        return failed(request, status, error, self.clock.wall_ns())

    async def _settle(self, answer: MllmAnswer, ctx: Context, request: MllmRequest) -> None:
        """The answer to the request being taken in: it is no longer owed."""
        self._taking = None
        await self._answer(answer, ctx, request)

    async def _answer(self, answer: MllmAnswer, ctx: Context, request: MllmRequest) -> None:
        """Send one answer record (to ``request``): the only way answers leave the stage."""
        if request.wall_ns:
            self.answer_latency.observe(max(0.0, (self.clock.wall_ns() - request.wall_ns) / 1e9))
        ctx.count(f"answers_{answer.status}", source=answer.source_id)
        for kind, n in answer.tokens.items():
            ctx.count(f"tokens_{kind}", n, source=answer.source_id)
        if self.asks is not None:
            self.asks.release(answer.source_id, answer.event_id)
        answer = self.repeats.mark(answer)
        if answer.repeat:
            ctx.count("answers_repeated", source=answer.source_id)
        await ctx.emit("answers", answer)
        if self.watch_ticker is not None:
            await self.watch_ticker.observe(answer, ctx)

    async def _work(self, item: Queued, ctx: Context) -> None:
        """Answer ``item``, then start what the flow lets start. Nothing but cancellation
        ends it early."""
        try:
            try:
                answer = await self._call(item, ctx)
            except Exception as exc:
                log.error("MLLM stage failed on %s: %s", item.request.event_id, describe_error(exc))
                answer = failed(item.request, "error", describe_error(exc), self.clock.wall_ns(), self.backend)
            await self._answer(answer, ctx, item.request)
            item.answered = True  # from here on it is not answered again, even if stopped mid-way
        finally:
            started, refused = self.calls.done(item)
            await self._start(started, refused, ctx)

    async def _call(self, item: Queued, ctx: Context) -> MllmAnswer:
        request = item.request
        if self.memory is not None:
            request = dataclasses.replace(request, memory=self.memory.seen_by(request),
                                          summary_tokens=self.memory.memory.tokens)  # fmt: skip
        busy = await self.model.busy_after(STUCK_GRACE_S)
        if busy is not None:
            ctx.count("refused_stuck", source=request.source_id)
            why = f"the model is still busy with a call given up on {busy:.0f} s ago"
            return self._failed(request, "error", why)
        started = self.clock.now_s()
        try:
            answer = await asyncio.wait_for(self.backend.answer(request), self.timeout_s)
        except TimeoutError:
            log.warning("MLLM call for %s timed out after %.0f s", request.event_id, self.timeout_s)
            answer = failed(request, "timeout", f"no answer within {self.timeout_s:g} s", self.clock.wall_ns(),
                            self.backend, self.clock.now_s() - started)  # fmt: skip
        except Exception as exc:
            log.warning("MLLM call for %s failed: %s", request.event_id, describe_error(exc))
            answer = failed(request, "error", describe_error(exc), self.clock.wall_ns(), self.backend,
                            self.clock.now_s() - started)  # fmt: skip
        else:
            ctx.count("model_calls", source=request.source_id)
            self.call_latency.observe(self.clock.now_s() - started)
        self.model.called(answer)
        queued = max(0.0, self.calls.queued_s(item) - answer.timings.get("total", 0.0))
        answer = dataclasses.replace(answer, timings={**answer.timings, "queued": queued})
        ctx.count("call_ms", round(1000 * answer.timings.get("total", 0.0)), source=request.source_id)
        for name, total in self.backend.counters().items():  # totals since the backend started
            ctx.counters[name] = total
        try:
            self.reuse.remember(request.source_id, request.question, request.signature, request.pts_ns, answer)
            if self.memory is not None:
                await self.memory.remember(answer, request, ctx)
        except Exception as exc:  # the answer stands; what is kept of it for later is lost
            log.error("cannot keep the answer to %s for later calls: %s", request.event_id, describe_error(exc))
            ctx.count("memory_errors")
        return answer

"""The MLLM stage: events in, answers out, without ever holding up perception.

For each event that calls the model (``call_model``: ``new`` / ``update`` within the
trigger's budget, and every ``ask``), and for each :class:`MllmRequest` sent to it
directly, the stage:

1. builds the request (keyframe, region crop, question, context) off the event loop;
2. **reuses** the last answer when the scene and question have not changed
   (:class:`~stream_rt.policies.answer_reuse.AnswerReuse`; status ``reused``, no call);
3. **limits the flow**: one call in flight, one waiting; with ``flow="latest"`` (live) a
   newer request replaces the waiting one, which is answered with status ``dropped`` (so
   every event that asked gets exactly one answer record); with ``flow="block"``
   (replays) a newer request waits for room instead, slowing the graph to the model;
4. calls the backend with a **timeout**; a backend that raises or hangs yields an answer
   with status ``error`` or ``timeout`` and the next request goes ahead.

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
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Literal

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
)
from stream_rt.memory.streaming import StreamingMemory
from stream_rt.mllm.backend import Backend, MissingWeights
from stream_rt.mllm.clips import ClipBuffer
from stream_rt.mllm.prompt import DEFAULT_QUESTION
from stream_rt.mllm.requests import build_request
from stream_rt.policies.answer_reuse import AnswerReuse
from stream_rt.policies.flow import FlowLimiter

log = logging.getLogger("stream_rt.mllm")


class MllmStage(Node):
    inputs = {"events": (Event,), "requests": (MllmRequest,), "video": (VideoFrame,), "audio": (AudioFeatures,)}
    outputs = {"answers": (MllmAnswer,)}

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
        snapshot_interval_s: float = 60.0,
    ) -> None:
        super().__init__(name)
        self.backend = backend
        self.question = question
        self.timeout_s = timeout_s
        self.max_side = max_side
        self.crop_regions = crop_regions
        self.reuse = AnswerReuse(reuse_threshold, reuse_max_age_s)
        self.flow: FlowLimiter[tuple[MllmRequest, float]] = FlowLimiter()
        self.block = flow == "block"
        self.clip = clip
        self.memory = memory
        self.memory_snapshot = memory_snapshot
        self.snapshot_interval_s = snapshot_interval_s
        self._saved_at = time.monotonic()
        self._room = asyncio.Event()  # set whenever the waiting slot is free
        self._worker: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self, ctx: Context) -> None:
        """Load the backend. Missing weights stop the graph (a configuration to fix); any
        other failure is logged and each call then reports it, while perception goes on."""
        try:
            await self.backend.start()
        except MissingWeights:
            raise
        except Exception as exc:
            log.error("MLLM backend '%s' cannot start: %s", self.backend.name, describe_error(exc))
            ctx.count("backend_start_errors")
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
            return
        if isinstance(packet, AudioFeatures):
            if self.clip is not None:
                self.clip.add_audio(packet)
            return
        if isinstance(packet, Event):
            if not packet.call_model or packet.frame is None:
                return
            try:
                if self.clip is not None:
                    request = await asyncio.to_thread(self.clip.request, packet, self.question, self.max_side)
                else:
                    request = await asyncio.to_thread(
                        build_request, packet, self.question, max_side=self.max_side, crop_regions=self.crop_regions
                    )
            except Exception as exc:
                ctx.count("request_errors")
                log.warning("cannot build a request for %s: %s", packet.event_id, describe_error(exc))
                return
        else:
            assert isinstance(packet, MllmRequest)
            request = packet
        ctx.count("requests")
        reused = self.reuse.lookup(request.source_id, request.question, request.signature, request.pts_ns)
        if reused is not None:
            ctx.count("answers_reused")
            await ctx.emit("answers", _reused(request, reused))
            return
        while self.block and self.flow.waiting is not None:
            self._room.clear()
            await self._room.wait()
        start_now, replaced = self.flow.offer((request, time.perf_counter()))
        if replaced is not None:
            ctx.count("requests_replaced")
            await ctx.emit("answers", _failed(replaced[0], "dropped", "replaced by a newer request while waiting"))
        if start_now:
            self._idle.clear()
            self._worker = asyncio.create_task(self._work(ctx), name=f"stream_rt:{self.name}:calls")

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, EndOfStream):
            await self._idle.wait()

    async def stop(self, ctx: Context) -> None:
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        await self.backend.close()
        if self.memory is not None and self.memory_snapshot is not None:
            await asyncio.to_thread(self._save_memory, self.memory, self.memory_snapshot)

    def gauges(self, now_ns: int) -> dict[str, float]:
        gauges = {"in_flight": float(self.flow.in_flight is not None), "waiting": float(self.flow.waiting is not None)}
        if self.memory is not None:
            entries = [e for source in self.memory.sources for e in self.memory.entries(source)]
            gauges["memory_entries"] = float(len(entries))
            gauges["memory_visual_tokens"] = float(sum(e.visual.shape[0] for e in entries))
        return gauges

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

    async def _work(self, ctx: Context) -> None:
        """Answer the in-flight request, then the waiting one, until none is left."""
        item = self.flow.in_flight
        try:
            while item is not None:
                request, queued_at = item
                answer = await self._call(request, ctx)
                timings = {"queued": max(0.0, time.perf_counter() - queued_at - answer.timings.get("total", 0.0))}
                answer = dataclasses.replace(answer, timings={**answer.timings, **timings})
                self.reuse.remember(request.source_id, request.question, request.signature, request.pts_ns, answer)
                await self._remember(answer, request, ctx)
                ctx.count(f"answers_{answer.status}")
                for kind, n in answer.tokens.items():
                    ctx.count(f"tokens_{kind}", n)
                ctx.count("call_ms", round(1000 * answer.timings.get("total", 0.0)))
                await ctx.emit("answers", answer)
                item = self.flow.done()
                self._room.set()
        finally:
            self._room.set()
            self._idle.set()

    async def _call(self, request: MllmRequest, ctx: Context) -> MllmAnswer:
        started = time.perf_counter()
        if self.memory is not None:
            memory = tuple(self.memory.entries(request.source_id))
            request = dataclasses.replace(request, memory=memory, summary_tokens=self.memory.tokens)
        try:
            answer = await asyncio.wait_for(self.backend.answer(request), self.timeout_s)
        except TimeoutError:
            log.warning("MLLM call for %s timed out after %.0f s", request.event_id, self.timeout_s)
            return _failed(request, "timeout", f"no answer within {self.timeout_s:g} s", self.backend, started)
        except Exception as exc:
            log.warning("MLLM call for %s failed: %s", request.event_id, describe_error(exc))
            return _failed(request, "error", describe_error(exc), self.backend, started)
        ctx.count("model_calls")
        return answer


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
    )  # fmt: skip

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
from typing import Literal

from stream_rt.graph.node import Context, Node, describe_error
from stream_rt.graph.packets import AnswerStatus, EndOfStream, Event, MllmAnswer, MllmRequest, Packet
from stream_rt.mllm.backend import Backend, MissingWeights
from stream_rt.mllm.prompt import DEFAULT_QUESTION
from stream_rt.mllm.requests import build_request
from stream_rt.policies.answer_reuse import AnswerReuse
from stream_rt.policies.flow import FlowLimiter

log = logging.getLogger("stream_rt.mllm")


class MllmStage(Node):
    inputs = {"events": (Event,), "requests": (MllmRequest,)}
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

    async def process(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, Event):
            if not packet.call_model or packet.frame is None:
                return
            try:
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

    def gauges(self, now_ns: int) -> dict[str, float]:
        return {"in_flight": float(self.flow.in_flight is not None), "waiting": float(self.flow.waiting is not None)}

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

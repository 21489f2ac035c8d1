"""Many cameras, one model: the MLLM stage's calls are shared fairly between sources."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from stream_rt.config import ConfigError, MllmConfig, parse_config
from stream_rt.graph.packets import Event, MllmAnswer, MllmRequest
from stream_rt.mllm.backend import OnText
from stream_rt.mllm.stage import MllmStage
from stream_rt.policies.flow import FairFlow
from tests.test_mllm import ScriptedBackend, clip_frames, event_for, run_stage


def in_parallel(calls: int) -> MllmConfig:
    """The stage's settings for ``calls`` model calls at once, without answer reuse (several
    calls at once is the 'openai' backend's setting: a local model runs one at a time)."""
    return MllmConfig(backend="openai", url="http://127.0.0.1:8000/v1", max_in_flight=calls, reuse_threshold=0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_source_keeps_its_own_waiting_place_and_turns_go_round() -> None:
    flow: FairFlow[str] = FairFlow(max_in_flight=1)
    assert flow.offer("busy", "b1") == (["b1"], None, [])
    assert flow.offer("busy", "b2") == ([], None, [])
    assert flow.offer("quiet", "q1") == ([], None, [])
    assert flow.offer("busy", "b3") == ([], "b2", []), "a newer request replaces only its own source's"
    assert flow.done("b1") == (["q1"], []), "the quiet camera was waiting longer for its turn"
    assert flow.offer("busy", "b4") == ([], "b3", [])
    assert flow.done("q1") == (["b4"], [])
    assert flow.offer("quiet", "ask", priority=True) == ([], None, [])
    assert flow.offer("busy", "b5") == ([], None, [])
    assert flow.done("b4") == (["ask"], []), "asked questions go before routine ones"
    assert flow.clear() == ["ask", "b5"]


def test_up_to_max_in_flight_start_at_once_and_the_budget_refuses_routine_calls() -> None:
    clock = Clock()
    flow: FairFlow[str] = FairFlow(max_in_flight=2, per_minute=3, clock=clock)
    assert flow.offer("a", "a1") == (["a1"], None, [])
    assert flow.offer("b", "b1") == (["b1"], None, [])
    assert flow.offer("c", "c1") == ([], None, []) and len(flow.in_flight) == 2
    assert flow.offer("a", "a2") == ([], None, [])
    assert flow.done("a1") == (["c1"], []), "c waited longer than a's second"
    assert flow.done("b1") == ([], ["a2"]), "three routine calls in the last minute: the fourth is refused"
    assert flow.offer("b", "ask", priority=True) == (["ask"], None, []), "questions someone asked are not budgeted"
    assert flow.done("c1") == ([], []) and flow.offer("d", "d1") == ([], None, ["d1"])
    clock.now = 60.0
    assert flow.offer("d", "d2") == (["d2"], None, []), "a minute later the budget has room again"
    with pytest.raises(ValueError):
        FairFlow(max_in_flight=0)


def source_event(event: Event, source: str, n: int, kind: str = "new") -> Event:
    return dataclasses.replace(event, source_id=source, event_id=f"{source}-{n}", type=kind)  # type: ignore[arg-type]


class CountingBackend(ScriptedBackend):
    """Answers after ``delay_s``, keeping count of how many calls run at once."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s=delay_s)
        self.running = 0
        self.peak = 0

    async def answer(self, request: MllmRequest, on_text: OnText | None = None) -> MllmAnswer:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            return await super().answer(request, on_text)
        finally:
            self.running -= 1


async def test_a_busy_camera_cannot_starve_a_quiet_one(samples: Path) -> None:
    [frame] = clip_frames(samples, [100])
    base = event_for(frame, 0)
    events = [source_event(base, "busy", n) for n in range(10)]
    events.insert(3, source_event(base, "quiet", 0))
    backend = CountingBackend(delay_s=0.3)
    answers = await run_stage(MllmStage("mllm", backend, MllmConfig(reuse_threshold=0)), list(events), gap_s=0.02)
    status = {a.event_id: a for a in answers}
    assert len(answers) == len(events) and set(status) == {e.event_id for e in events}, "one answer each"
    assert status["quiet-0"].status == "ok", "the quiet camera's request was not replaced"
    assert backend.calls == ["busy-0", "quiet-0", "busy-9"]
    dropped = [a for a in answers if a.status == "dropped"]
    assert len(dropped) == 8 and all("newer request of its source" in a.error for a in dropped)


async def test_calls_run_at_once_up_to_max_in_flight_round_robin(samples: Path) -> None:
    [frame] = clip_frames(samples, [100])
    base = event_for(frame, 0)
    events = [source_event(base, f"cam{s}", n) for n in range(2) for s in range(6)]
    backend = CountingBackend(delay_s=0.3)
    stage = MllmStage("mllm", backend, in_parallel(3))
    answers = await run_stage(stage, list(events))
    assert backend.peak == 3
    status = {a.event_id: a.status for a in answers}
    assert len(answers) == 12 and [e for e, s in status.items() if s == "dropped"] == ["cam3-0", "cam4-0", "cam5-0"]
    assert backend.calls[:3] == ["cam0-0", "cam1-0", "cam2-0"], "three at once"
    assert backend.calls[3:6] == ["cam3-1", "cam4-1", "cam5-1"], "then the cameras not served yet"
    assert stage.flow.in_flight == [] and stage.flow.queued == 0


async def test_the_budget_across_cameras_answers_what_it_refuses(samples: Path) -> None:
    [frame] = clip_frames(samples, [100])
    base = event_for(frame, 0)
    events = [source_event(base, f"cam{s}", 0) for s in range(5)] + [source_event(base, "cam0", 1, kind="ask")]
    stage = MllmStage("mllm", CountingBackend(delay_s=0.05), MllmConfig(reuse_threshold=0, calls_per_minute=2))
    answers = {a.event_id: a for a in await run_stage(stage, list(events), gap_s=0.1)}
    assert [answers[f"cam{s}-0"].status for s in range(5)] == ["ok", "ok", "dropped", "dropped", "dropped"]
    assert "budget of 2 model calls a minute" in answers["cam4-0"].error
    assert answers["cam0-1"].status == "ok", "a question someone asked is answered beyond the budget"


def test_more_than_one_call_at_once_needs_a_server() -> None:
    with pytest.raises(ConfigError, match="max_in_flight > 1 needs the 'openai' backend"):
        parse_config({"sources": [{"id": "a", "url": "x.mp4"}], "mllm": {"max_in_flight": 2}})
    remote = {"backend": "openai", "url": "http://127.0.0.1:9/v1", "model": "m"}
    assert parse_config({"sources": [{"id": "a", "url": "x.mp4"}], "mllm": remote}).mllm.in_flight == 4
    assert asyncio.iscoroutinefunction(MllmStage.process)


class SlowToCancel(CountingBackend):
    """A call that takes a moment to give up when cancelled (a stream being released)."""

    async def answer(self, request: MllmRequest, on_text: OnText | None = None) -> MllmAnswer:
        try:
            return await super().answer(request, on_text)
        except asyncio.CancelledError:
            await asyncio.sleep(0.1)
            raise


async def test_stopping_with_calls_in_flight_answers_each_request_once() -> None:
    from stream_rt.graph.channel import Channel
    from stream_rt.graph.clock import RealtimeClock
    from stream_rt.graph.node import Context

    out = Channel("answers", "block", 64)
    ctx = Context("mllm", RealtimeClock(), {"answers": [out]}, MllmStage.outputs, asyncio.Event())
    backend = SlowToCancel(delay_s=0.05)
    stage = MllmStage("mllm", backend, in_parallel(2))
    await stage.start(ctx)
    for source in ("a", "b", "c", "d"):
        await stage.process(MllmRequest(source, 0, 0, 0, f"{source}-0", "q"), ctx)
    await asyncio.sleep(0.01)
    await stage.stop(ctx)  # while it cancels one call, another may finish and start the next
    await asyncio.sleep(0.3)
    answers = []
    while (packet := out.get_nowait()) is not None:
        answers.append(packet.event_id)
    assert sorted(answers) == ["a-0", "b-0", "c-0", "d-0"], "each request answered once, none after stop"
    assert len(backend.calls) == 2 and not stage._calls, "nothing started once stopping"


async def test_the_stage_reads_time_on_the_graphs_clock() -> None:
    """The budget's minute is the graph clock's minute, and the answers the stage writes
    itself carry the clock's wall time (a stage reading the wall clock itself failed both)."""
    from stream_rt.graph.channel import Channel
    from stream_rt.graph.clock import ManualClock
    from stream_rt.graph.node import Context

    clock = ManualClock()
    out = Channel("answers", "block", 64)
    ctx = Context("mllm", clock, {"answers": [out]}, MllmStage.outputs, asyncio.Event())
    stage = MllmStage("mllm", CountingBackend(delay_s=0), MllmConfig(reuse_threshold=0, calls_per_minute=1))
    await stage.start(ctx)

    async def ask(source: str) -> MllmAnswer:
        await stage.process(MllmRequest(source, 0, 0, 0, f"{source}-0", "q"), ctx)
        for _ in range(200):
            if (packet := out.get_nowait()) is not None:
                assert isinstance(packet, MllmAnswer)
                return packet
            await asyncio.sleep(0.01)
        raise AssertionError(f"no answer for {source}")

    assert (await ask("a")).status == "ok"
    refused = await ask("b")
    assert refused.status == "dropped" and refused.wall_ns == clock.wall_ns(), "stamped by the graph's clock"
    await clock.advance(60)
    assert (await ask("c")).status == "ok", "a minute on the graph's clock later, the budget has room again"
    await stage.stop(ctx)

"""A clip is the frames before its event, whatever order the two edges deliver them in.

The video reaches the MLLM stage on an edge of its own, the events through the trigger: the
video usually runs ahead, and while a call blocks, a backlog of video lets events overtake
the frames before them. Either way each call must be shown the same clip.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from stream_rt import CallbackSink, Event, Graph, MllmAnswer, MllmRequest, ReplayClock, VideoFrame
from stream_rt.config import ClipConfig, MllmConfig
from stream_rt.graph import Context
from stream_rt.mllm.backend import OnText
from stream_rt.mllm.stage import MllmStage
from stream_rt.testing import ListSource
from tests.test_mllm import ScriptedBackend, clip_frames, event_for


class Camera(ListSource):
    """Sends frames on ``video`` and events on ``events`` in exactly the order given."""

    outputs = {"video": (VideoFrame,), "events": (Event,)}

    async def run(self, ctx: Context) -> None:
        for packet in self.packets:
            await ctx.emit("video" if isinstance(packet, VideoFrame) else "events", packet)
            await asyncio.sleep(0.002)  # the stage takes each packet before the next is sent


class Shown(ScriptedBackend):
    def __init__(self) -> None:
        super().__init__()
        self.clips: dict[str, tuple[int, ...]] = {}

    async def answer(self, request: MllmRequest, on_text: OnText | None = None) -> MllmAnswer:
        self.clips[request.event_id] = request.frame_pts
        return await super().answer(request, on_text)


@pytest.mark.parametrize("lead_s", [1.5, -0.8])
async def test_each_call_is_shown_the_frames_before_its_event_whichever_edge_runs_ahead(
    lead_s: float, samples: Path
) -> None:
    """The video ``lead_s`` seconds ahead of the events, or (negative) behind them."""
    frames = clip_frames(samples, list(range(61)))  # 6 s at 10 frames a second
    events = [event_for(frames[i], n) for n, i in enumerate((12, 30, 60))]
    order = sorted([*frames, *events], key=lambda p: p.pts_ns + (0 if isinstance(p, VideoFrame) else lead_s * 1e9))
    backend = Shown()
    stage = MllmStage("mllm", backend, MllmConfig(reuse_threshold=0, clip=ClipConfig(frames=3, interval_s=0.5)))
    answers: list[MllmAnswer] = []
    graph = Graph(clock=ReplayClock(None))
    graph.add(Camera("cam", order))
    graph.add(stage)
    graph.add(CallbackSink("sink", lambda p: answers.append(p) if isinstance(p, MllmAnswer) else None))
    graph.connect("cam.video", "mllm.video", capacity=64)
    graph.connect("cam.events", "mllm.events")
    graph.connect("mllm.answers", "sink.in")
    await graph.run()
    assert sorted(a.event_id for a in answers) == ["cam-0", "cam-1", "cam-2"], "every event answered once"
    ms = 1_000_000
    assert backend.clips == {  # frames sampled every 0.5 s from the first; the event's own frame last
        "cam-0": (0, 500 * ms, 1200 * ms),
        "cam-1": (2000 * ms, 2500 * ms, 3000 * ms),
        "cam-2": (5000 * ms, 5500 * ms, 6000 * ms),
    }

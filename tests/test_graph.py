"""The graph: wiring checked at build, supervision, draining, stopping from every state."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from stream_rt import (
    AudioChunk,
    CallbackSink,
    Context,
    EndOfStream,
    Graph,
    GraphBuildError,
    ManualClock,
    Node,
    NodeFailed,
    Packet,
    Source,
    Supervision,
    SyntheticSource,
    VideoFrame,
)
from stream_rt.testing import run_node


class Brightness(Node):
    inputs = {"video": (VideoFrame,)}
    outputs = {"level": (VideoFrame,)}

    async def process(self, packet: Packet, ctx: Context) -> None:
        await ctx.emit("level", packet)


class AudioOnly(Node):
    inputs = {"audio": (AudioChunk,)}


class Flaky(Node):
    """Raises on the packets whose seq is listed; counts starts and stops."""

    inputs = {"in": (VideoFrame,)}
    outputs = {"out": (VideoFrame,)}

    def __init__(self, name: str, fail_on: set[int]) -> None:
        super().__init__(name)
        self.fail_on = fail_on
        self.starts = 0
        self.stops = 0

    async def start(self, ctx: Context) -> None:
        self.starts += 1

    async def stop(self, ctx: Context) -> None:
        self.stops += 1

    async def process(self, packet: Packet, ctx: Context) -> None:
        if packet.seq in self.fail_on:
            raise ValueError(f"cannot handle frame {packet.seq}")
        await ctx.emit("out", packet)


def test_wrong_wiring_fails_at_build_naming_both_ends() -> None:
    graph = Graph()
    graph.add(SyntheticSource("cam"))
    graph.add(AudioOnly("vad"))
    with pytest.raises(GraphBuildError) as err:
        graph.connect("cam.video", "vad.audio")
    message = str(err.value)
    assert "'cam.video'" in message and "'vad.audio'" in message
    assert "VideoFrame" in message and "AudioChunk" in message


def test_unknown_nodes_ports_and_unconnected_inputs_fail_at_build() -> None:
    graph = Graph()
    graph.add(SyntheticSource("cam"))
    graph.add(Brightness("bright"))
    with pytest.raises(GraphBuildError, match="unknown node 'camera'"):
        graph.connect("camera.video", "bright.video")
    with pytest.raises(GraphBuildError, match="node 'cam' has no output port 'vid'"):
        graph.connect("cam.vid", "bright.video")
    with pytest.raises(GraphBuildError, match="node 'bright' has no input connected"):
        graph.check()
    with pytest.raises(GraphBuildError, match="already in the graph"):
        graph.add(Brightness("bright"))


async def test_every_packet_reaches_the_sink_in_order() -> None:
    graph = Graph(clock=ManualClock())
    got: list[Packet] = []
    graph.add(SyntheticSource("cam", frames=200))
    graph.add(Brightness("bright"))
    graph.add(CallbackSink("sink", got.append))
    graph.connect("cam.video", "bright.video", capacity=4)
    graph.connect("bright.level", "sink.in", capacity=4)
    await asyncio.wait_for(graph.run(), 10)
    assert [p.seq for p in got] == list(range(200))
    stats = graph.statistics()
    assert stats["nodes"]["bright"]["processed"] == 200
    assert all(edge["dropped_total"] == 0 for edge in stats["edges"].values())


async def test_a_raising_node_is_restarted_and_goes_on() -> None:
    flaky = Flaky("flaky", fail_on={3, 7})
    out = await run_node(
        flaky,
        [VideoFrame("cam", i, i, 0, np.zeros((2, 2), np.uint8)) for i in range(10)],
        supervision=Supervision(on_error="restart", backoff_s=0.0),
    )
    assert [p.seq for p in out["out"] if isinstance(p, VideoFrame)] == [0, 1, 2, 4, 5, 6, 8, 9]
    assert isinstance(out["out"][-1], EndOfStream)
    assert flaky.starts == 3 and flaky.stops == 3  # two restarts, then the final stop


async def test_a_raising_node_stops_the_graph_when_so_configured(caplog: pytest.LogCaptureFixture) -> None:
    graph = Graph(clock=ManualClock(), drain_timeout_s=1)
    got: list[Packet] = []
    graph.add(SyntheticSource("cam", frames=None))  # endless: only the failure can stop it
    graph.add(Flaky("flaky", fail_on={5}), Supervision(on_error="stop"))
    graph.add(CallbackSink("sink", got.append))
    graph.connect("cam.video", "flaky.in")
    graph.connect("flaky.out", "sink.in")
    with pytest.raises(NodeFailed, match="node 'flaky' failed: ValueError: cannot handle frame 5"):
        await asyncio.wait_for(graph.run(), 10)
    assert [p.seq for p in got] == [0, 1, 2, 3, 4]
    assert "node 'flaky' raised ValueError" in caplog.text


async def test_restarts_are_bounded_then_the_graph_stops() -> None:
    graph = Graph(clock=ManualClock())
    graph.add(SyntheticSource("cam", frames=None))
    graph.add(Flaky("flaky", fail_on=set(range(100))), Supervision(on_error="restart", max_restarts=3, backoff_s=0))
    graph.add(CallbackSink("sink", lambda p: None))
    graph.connect("cam.video", "flaky.in")
    graph.connect("flaky.out", "sink.in")
    with pytest.raises(NodeFailed):
        await asyncio.wait_for(graph.run(), 10)
    assert graph.statistics()["nodes"]["flaky"]["restarts"] == 3


async def test_restart_waits_the_backoff_on_the_graph_clock() -> None:
    clock = ManualClock()
    graph = Graph(clock=clock)
    got: list[Packet] = []
    graph.add(SyntheticSource("cam", frames=3))
    graph.add(Flaky("flaky", fail_on={0}), Supervision(on_error="restart", backoff_s=5.0))
    graph.add(CallbackSink("sink", got.append))
    graph.connect("cam.video", "flaky.in")
    graph.connect("flaky.out", "sink.in")
    run = asyncio.create_task(graph.run())
    for _ in range(20):
        await asyncio.sleep(0)
    assert got == [] and clock.pending_sleepers == 1, "the restart must wait for its backoff"
    await clock.advance(5.0)
    await asyncio.wait_for(run, 5)
    assert [p.seq for p in got] == [1, 2]


class NeverConnects(Source):
    """A source stuck before its first packet (an unreachable camera)."""

    outputs = {"video": (VideoFrame,)}

    async def run(self, ctx: Context) -> None:
        await asyncio.Event().wait()


async def test_stop_works_for_a_source_that_never_connected() -> None:
    graph = Graph(drain_timeout_s=1)
    got: list[Packet] = []
    graph.add(NeverConnects("cam"))
    graph.add(CallbackSink("sink", got.append, control=True))
    graph.connect("cam.video", "sink.in")
    run = asyncio.create_task(graph.run())
    await asyncio.sleep(0.05)
    graph.stop()
    await asyncio.wait_for(run, 2)
    assert len(got) == 1 and isinstance(got[0], EndOfStream) and got[0].reason == "stopped"


async def test_stop_before_run_and_after_run_is_harmless() -> None:
    graph = Graph(clock=ManualClock())
    graph.add(SyntheticSource("cam", frames=5))
    graph.add(CallbackSink("sink", lambda p: None))
    graph.connect("cam.video", "sink.in")
    graph.stop()
    await asyncio.wait_for(graph.run(), 5)
    graph.stop()


class SlowSink(CallbackSink):
    async def process(self, packet: Packet, ctx: Context) -> None:
        await asyncio.sleep(0.001)
        await super().process(packet, ctx)


async def test_stop_drains_what_the_source_already_emitted() -> None:
    graph = Graph(drain_timeout_s=5)
    source = SyntheticSource("cam", frames=None)
    got: list[Packet] = []
    graph.add(source)
    graph.add(SlowSink("sink", got.append))
    graph.connect("cam.video", "sink.in", capacity=32)
    run = asyncio.create_task(graph.run())
    await asyncio.sleep(0.1)
    graph.stop()
    await asyncio.wait_for(run, 5)
    assert source.emitted > 32, "the stop must catch packets in flight"
    assert [p.seq for p in got] == list(range(source.emitted)), (
        "every packet put into a channel before the stop is delivered"
    )


class FailsToStart(Brightness):
    async def start(self, ctx: Context) -> None:
        raise OSError("model file not mounted")


class TrackedSink(CallbackSink):
    stopped = 0

    async def stop(self, ctx: Context) -> None:
        self.stopped += 1


async def test_a_node_that_cannot_start_is_named_and_those_started_are_stopped() -> None:
    graph = Graph(clock=ManualClock())
    sink = TrackedSink("sink", lambda p: None)
    graph.add(SyntheticSource("cam"))
    graph.add(FailsToStart("bright"))
    graph.add(sink)
    graph.connect("cam.video", "bright.video")
    graph.connect("bright.level", "sink.in")
    with pytest.raises(NodeFailed, match="node 'bright' failed: OSError: model file not mounted"):
        await graph.run()
    assert sink.stopped == 1, "the sink, started first, is stopped again"
    with pytest.raises(RuntimeError, match="a graph runs once"):
        await graph.run()


def test_serve_runs_the_graph_to_completion() -> None:
    code = (
        "from stream_rt import CallbackSink, Graph, ManualClock, SyntheticSource\n"
        "g = Graph(clock=ManualClock()); got = []\n"
        "g.add(SyntheticSource('cam', frames=20)); g.add(CallbackSink('s', got.append))\n"
        "g.connect('cam.video', 's.in'); g.serve(); print(len(got))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "20"

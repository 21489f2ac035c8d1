"""A live stream served by a real ffmpeg process on loopback: read, lost, reconnected."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from pathlib import Path

from stream_rt import AvSource, CallbackSink, Graph, ManualClock, Packet, SourceStatus, VideoFrame
from stream_rt.config import BackoffConfig, InputConfig
from stream_rt.testing import StreamServer

from .processes import RecordProperty


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def live_graph(port: int, **kwargs: object) -> tuple[Graph, AvSource, list[Packet]]:
    graph = Graph(drain_timeout_s=2)
    source = AvSource(
        "cam",
        f"tcp://127.0.0.1:{port}",
        audio=False,
        config=InputConfig(reconnect=BackoffConfig(initial_s=0.2, max_s=1.0, jitter=0.1), **kwargs),  # type: ignore[arg-type]
        seed=1,
    )
    got: list[Packet] = []
    graph.add(source)
    graph.add(CallbackSink("sink", got.append, control=True))
    graph.connect("cam.video", "sink.in", policy="latest")
    graph.connect("cam.status", "sink.in")
    return graph, source, got


def frames(got: list[Packet]) -> list[VideoFrame]:
    return [p for p in got if isinstance(p, VideoFrame)]


def states(got: list[Packet]) -> list[str]:
    return [p.state for p in got if isinstance(p, SourceStatus)]


async def test_source_reconnects_after_the_server_is_killed_and_restarted(
    server: StreamServer, free_port: int, record_property: RecordProperty
) -> None:
    graph, source, got = live_graph(free_port, stall_timeout_s=5, timeout_s=5)
    assert source.live
    run = asyncio.create_task(graph.run())
    recoveries: list[float] = []
    try:
        for round_ in range(2):
            before = len(frames(got))
            await wait_for(lambda b=before: len(frames(got)) >= b + 10, 20, f"frames (round {round_})")  # type: ignore[misc]
            server.kill()
            await wait_for(lambda: source.state == "offline", 10, "the source to report offline")
            await asyncio.sleep(0.5)  # a few failed reconnects while the server is down
            server.start()
            restarted = time.monotonic()
            await wait_for(lambda: source.state == "online", 20, "the source to come back online")
            recoveries.append(time.monotonic() - restarted)
        before = len(frames(got))
        await wait_for(lambda: len(frames(got)) >= before + 10, 20, "frames after the last reconnect")
    finally:
        graph.stop()
        await asyncio.wait_for(run, 10)
    record_property("recovery_s", round(max(recoveries), 3))
    assert states(got)[:5] == ["online", "offline", "online", "offline", "online"]
    assert graph.statistics()["nodes"]["cam"]["reconnects"] >= 2
    pts = [f.pts_ns for f in frames(got)]
    assert all(b > a for a, b in itertools.pairwise(pts)), "pts stay monotonic across reconnects"


async def test_a_stalled_stream_is_detected_by_the_watchdog(
    server: StreamServer, free_port: int, record_property: RecordProperty
) -> None:
    graph, source, got = live_graph(free_port, stall_timeout_s=1.0, timeout_s=30)
    run = asyncio.create_task(graph.run())
    try:
        await wait_for(lambda: len(frames(got)) >= 5, 20, "first frames")
        server.pause()  # the connection stays open but nothing arrives
        paused = time.monotonic()
        await wait_for(lambda: source.state == "offline", 5, "the watchdog to notice the stall")
        record_property("detected_s", round(time.monotonic() - paused, 3))
        offline = [p for p in got if isinstance(p, SourceStatus) and p.state == "offline"]
        assert offline[0].detail == "no frame for 1 s"
        server.kill()
        server.start()
        restarted = time.monotonic()
        await wait_for(lambda: source.state == "online", 20, "the source to recover")
        record_property("recovery_s", round(time.monotonic() - restarted, 3))
    finally:
        graph.stop()
        await asyncio.wait_for(run, 10)


async def test_stop_while_the_camera_was_never_reachable(free_port: int) -> None:
    graph, source, got = live_graph(free_port, stall_timeout_s=1.0, timeout_s=1.0)
    run = asyncio.create_task(graph.run())
    await wait_for(lambda: graph.statistics()["nodes"]["cam"].get("reconnects", 0) >= 2, 10, "reconnect attempts")
    assert frames(got) == [] and source.state == "offline"
    graph.stop()
    await asyncio.wait_for(run, 3)


async def test_a_camera_back_after_a_long_outage_is_seen_within_10_s(
    ffmpeg: str, samples: Path, free_port: int
) -> None:
    """The default backoff's cap bounds how long a camera that came back stays unseen: a
    camera down for five minutes (of the graph's clock), back just after a failed attempt,
    is online within 10 s (the cap was 30 s: 22 s measured by a user)."""
    clock = ManualClock()
    graph = Graph(clock=clock, drain_timeout_s=2)
    camera = AvSource(
        "cam", f"tcp://127.0.0.1:{free_port}", audio=False, config=InputConfig(timeout_s=5)
    )  # the default backoff
    graph.add(camera)
    graph.add(CallbackSink("sink", lambda p: None))
    graph.connect("cam.video", "sink.in", policy="latest")
    server = StreamServer(ffmpeg, samples / "vtest.avi", free_port)
    run = asyncio.create_task(graph.run())

    async def waiting() -> None:  # until the camera sleeps on the clock (or is online)
        await wait_for(lambda: clock.pending_sleepers == 1 or camera.state == "online", 20, "a reconnect wait")

    try:
        while clock.now_ns() < 300e9:  # refused, again and again: the waits grow to the cap
            await waiting()
            await clock.advance(0.5)
        while clock.pending_sleepers:  # the next attempt...
            await clock.advance(0.25)
        await waiting()  # ...failed: the longest wait begins
        server.start()
        back_ns = clock.now_ns()
        while camera.state != "online":
            await waiting()
            if camera.state != "online":
                await clock.advance(0.25)
        unseen_s = (clock.now_ns() - back_ns) / 1e9
        assert unseen_s <= 10.25, f"the camera came back but stayed unseen for {unseen_s:.1f} s"
        assert graph.statistics()["nodes"]["cam"]["reconnects"] >= 10
    finally:
        graph.stop()
        await asyncio.wait_for(run, 10)
        server.kill()


def test_a_configured_camera_reconnects_with_the_same_cap() -> None:
    """`stream-rt run` builds its cameras from the config, whose default cap was 30 s too."""
    from stream_rt.config import parse_config
    from stream_rt.pipeline import build_pipeline

    pipeline = build_pipeline(parse_config({"sources": [{"id": "gate", "url": "rtsp://192.0.2.1/stream"}]}))
    assert [s.backoff.max_s for s in pipeline.sources if isinstance(s, AvSource)] == [10.0]

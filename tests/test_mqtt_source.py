"""Frames published over MQTT by another program become a graph source."""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path

import av
import numpy as np
import paho.mqtt.publish as mqtt_publish
import pytest

from stream_rt import CallbackSink, Graph, ManualClock, Packet, ReplayClock, VideoFrame
from stream_rt.config import InputConfig, parse_config
from stream_rt.media.images import encode_jpeg, y_plane
from stream_rt.pipeline import build_pipeline
from stream_rt.sources.mqtt_source import MqttSource
from stream_rt.testing import Broker, Subscriber

from .test_mqtt import wait_until


async def test_jpeg_and_raw_frames_over_mqtt(samples: Path, free_port: int, tmp_path: Path) -> None:
    with av.open(str(samples / "vtest.avi")) as container:
        frames = [f for _, f in zip(range(5), container.decode(video=0), strict=False)]
    originals = [np.array(y_plane(f)) for f in frames]
    jpegs = [encode_jpeg(VideoFrame("cam", 0, 0, 0, y, lambda f=f: f.to_ndarray(format="rgb24"))) for f, y in
             zip(frames, originals, strict=True)]  # fmt: skip
    broker = Broker(free_port, tmp_path)
    broker.start()
    graph = Graph(clock=ReplayClock(None), drain_timeout_s=2)
    # Room for the whole burst: this test checks that every message is decoded.
    robot = MqttSource("robot", "robot/camera", port=free_port, queued=8)
    raw = MqttSource(
        "raw", "robot/gray", port=free_port, config=InputConfig(frames="gray", width=768, height=576), queued=8
    )
    got: list[Packet] = []
    for source in (robot, raw):
        graph.add(source)
    graph.add(CallbackSink("sink", got.append))
    graph.connect("robot.video", "sink.in")
    graph.connect("raw.video", "sink.in")
    run = asyncio.create_task(graph.run())
    try:
        await wait_until(lambda: robot.state == "online" and raw.state == "online", 5, "the subscriptions")
        messages = [("robot/camera", j) for j in jpegs] + [("robot/camera", b"\x00not a jpeg")]
        messages += [("robot/gray", originals[0].tobytes()), ("robot/gray", b"short")]
        for topic, payload in messages:
            await asyncio.to_thread(mqtt_publish.single, topic, payload, hostname="127.0.0.1", port=free_port)
        nodes = lambda: graph.statistics()["nodes"]  # noqa: E731
        await wait_until(
            lambda: len(got) >= 6 and nodes()["robot"].get("corrupt_frames") and nodes()["raw"].get("corrupt_frames"),
            10,
            "the frames and the rejected payloads",
        )
    finally:
        graph.stop()
        await asyncio.wait_for(run, 5)
        broker.kill()
    from_robot = [p for p in got if isinstance(p, VideoFrame) and p.source_id == "robot"]
    assert len(from_robot) == 5
    for frame, original in zip(from_robot, originals, strict=True):
        assert frame.y.shape == (576, 768) and frame.rgb().shape == (576, 768, 3)
        # JPEG luma is full range; the video decoder's is limited (16..235).
        full_range = np.clip((original.astype(float) - 16) * 255 / 219, 0, 255)
        assert np.abs(frame.y - full_range).mean() < 3, "a JPEG of the same picture"
    assert all(b.pts_ns > a.pts_ns for a, b in itertools.pairwise(from_robot))
    from_raw = [p for p in got if isinstance(p, VideoFrame) and p.source_id == "raw"]
    assert len(from_raw) == 1 and np.array_equal(from_raw[0].y, originals[0])
    nodes = graph.statistics()["nodes"]
    assert nodes["robot"]["corrupt_frames"] == 1 and nodes["raw"]["corrupt_frames"] == 1


async def test_a_config_with_an_mqtt_source_answers_an_ask_command(
    samples: Path, free_port: int, tmp_path: Path
) -> None:
    """Frames in over MQTT (mqtt:// source from the config), a question in over the ``ask``
    command, and the ``ask`` event out on the events topic with the id the reply named."""
    with av.open(str(samples / "vtest.avi")) as container:
        frames = [f for _, f in zip(range(40), container.decode(video=0), strict=False)]
    jpegs = [encode_jpeg(VideoFrame("cam", 0, 0, 0, y_plane(f), lambda f=f: f.to_ndarray(format="rgb24"))) for f in
             frames]  # fmt: skip
    broker = Broker(free_port, tmp_path)
    broker.start()
    config = parse_config({
        "sources": [{"id": "robot", "url": f"mqtt://127.0.0.1:{free_port}/robot/camera"}],
        "mllm": {"model": "smoke"},  # a question needs a model to answer it
        "sinks": {"mqtt": {"port": free_port, "outbox": str(tmp_path / "outbox.sqlite")}},
    })  # fmt: skip
    pipeline = build_pipeline(config)
    assert isinstance(pipeline.sources[0], MqttSource)
    subscriber = Subscriber(free_port, "stream_rt/#")
    run = asyncio.create_task(pipeline.graph.run())
    send = lambda topic, payload: mqtt_publish.single(topic, payload, qos=1, hostname="127.0.0.1", port=free_port)  # noqa: E731
    try:
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        await wait_until(lambda: pipeline.sources[0].state == "online", 5, "the subscription")
        await asyncio.sleep(0.3)  # the sink subscribes to commands after it connects
        await asyncio.to_thread(send, "stream_rt/robot/ask/set", b'{"question": "Who is walking?"}')
        await wait_until(lambda: subscriber.payloads("/robot/status"), 5, "the reply")
        for jpeg in jpegs:
            await asyncio.to_thread(send, "robot/camera", jpeg)
        # Each frame is emitted or, when the source was behind, replaced by a newer one.
        robot = lambda: pipeline.graph.statistics()["nodes"]["robot"]  # noqa: E731
        frames_in = lambda: robot().get("frames", 0) + robot().get("frames_replaced", 0)  # noqa: E731
        await wait_until(lambda: subscriber.payloads("/robot/events") and frames_in() == 40, 10, "the ask event")
        await wait_until(lambda: subscriber.payloads("/robot/answers"), 30, "its answer")
    finally:
        await subscriber.close()
        pipeline.graph.stop()
        await asyncio.wait_for(run, 10)
        broker.kill()
    reply = next(r for r in subscriber.payloads("/robot/status") if r.get("command") == "ask")
    assert reply["ok"] is True
    asks = [e for e in subscriber.payloads("/robot/events") if e["type"] == "ask"]
    assert [(e["event_id"], e["question"], e["call_model"]) for e in asks] == [
        (reply["event_id"], "Who is walking?", True)
    ]
    assert [a["event_id"] for a in subscriber.payloads("/robot/answers")] == [reply["event_id"]]


async def test_a_burst_faster_than_the_graph_keeps_the_newest_frames(free_port: int, tmp_path: Path) -> None:
    """While the consumer is stuck, 40 frames arrive: the source holds at most ``queued`` of
    them, replacing the oldest, so the newest are what the graph gets once it catches up."""
    broker = Broker(free_port, tmp_path)
    broker.start()
    graph = Graph(clock=ReplayClock(None), drain_timeout_s=2)
    source = MqttSource(
        "robot", "robot/gray", port=free_port, config=InputConfig(frames="gray", width=8, height=8), queued=2
    )
    release = asyncio.Event()
    got: list[int] = []

    async def slow(packet: Packet) -> None:
        await release.wait()
        assert isinstance(packet, VideoFrame)
        got.append(int(packet.y[0, 0]))

    graph.add(source)
    graph.add(CallbackSink("sink", slow))
    graph.connect("robot.video", "sink.in", policy="block", capacity=1)
    run = asyncio.create_task(graph.run())
    counters = lambda: graph.statistics()["nodes"]["robot"]  # noqa: E731
    try:
        await wait_until(lambda: source.state == "online", 5, "the subscription")
        burst = [{"topic": "robot/gray", "payload": bytes([i]) * 64} for i in range(40)]
        await asyncio.to_thread(mqtt_publish.multiple, burst, hostname="127.0.0.1", port=free_port)
        # While the sink is stuck the graph holds at most three frames (in the sink, in the
        # channel, in the source's emit) and the source's queue the newest two: the rest
        # were replaced.
        await wait_until(lambda: counters().get("frames_replaced", 0) >= 40 - 5, 10, "the burst")
        await asyncio.sleep(0.2)  # the rest of the burst, if any, is in
        release.set()
        await wait_until(lambda: len(got) + counters()["frames_replaced"] == 40, 5, "the held frames")
    finally:
        graph.stop()
        await asyncio.wait_for(run, 5)
        broker.kill()
    assert got[-2:] == [38, 39] and got == sorted(got), "the newest frames are delivered, in order"
    assert 3 <= len(got) <= 5 and counters()["frames"] == len(got)


async def test_a_burst_of_bad_payloads_is_counted_and_logged_once_a_minute(
    free_port: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Broker(free_port, tmp_path)
    broker.start()
    clock = ManualClock()
    graph = Graph(clock=clock, drain_timeout_s=2)
    source = MqttSource(
        "robot", "robot/gray", port=free_port, config=InputConfig(frames="gray", width=8, height=8), queued=32
    )
    got: list[Packet] = []
    graph.add(source)
    graph.add(CallbackSink("sink", got.append))
    graph.connect("robot.video", "sink.in")
    run = asyncio.create_task(graph.run())
    corrupt = lambda: graph.statistics()["nodes"]["robot"].get("corrupt_frames", 0)  # noqa: E731
    lines = lambda: [r for r in caplog.records if r.name == "stream_rt.sources" and "not a frame" in r.getMessage()]  # noqa: E731
    publish = lambda payloads: mqtt_publish.multiple(  # noqa: E731
        [{"topic": "robot/gray", "payload": p} for p in payloads], hostname="127.0.0.1", port=free_port
    )
    try:
        await wait_until(lambda: source.state == "online", 5, "the subscription")
        with caplog.at_level(logging.WARNING, "stream_rt.sources"):
            await asyncio.to_thread(publish, [b"short"] * 30)
            await wait_until(lambda: corrupt() == 30, 10, "the bad payloads")
            assert len(lines()) == 1 and lines()[0].levelno == logging.WARNING
            assert "needs 64 bytes, got 5" in lines()[0].getMessage()
            await clock.advance(61)
            await asyncio.to_thread(publish, [b"also short", bytes(64)])
            await wait_until(lambda: len(got) == 1, 10, "the good frame")
    finally:
        graph.stop()
        await asyncio.wait_for(run, 5)
        broker.kill()
    assert corrupt() == 31 and len(lines()) == 2
    summary = lines()[1].getMessage()
    assert "skipped 30 messages that were not a frame in the last 61 s" in summary and "got 10" in summary

"""Frames published over MQTT by another program become a graph source."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import av
import numpy as np
import paho.mqtt.publish as mqtt_publish

from stream_rt import CallbackSink, Graph, Packet, ReplayClock, VideoFrame
from stream_rt.operators.snapshot import encode_jpeg
from stream_rt.sources.av_decode import y_plane
from stream_rt.sources.mqtt_source import MqttSource

from .processes import Broker
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
    robot = MqttSource("robot", "robot/camera", port=free_port)
    raw = MqttSource("raw", "robot/gray", port=free_port, format="gray", width=768, height=576)
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

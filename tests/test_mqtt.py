"""The MQTT sink against a real mosquitto: topics, payloads, and nothing lost when the
broker goes away."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from stream_rt import Event, Graph, MllmAnswer, ReplayClock, Salience
from stream_rt.config import LOSSLESS_CHANNELS as LOSSLESS
from stream_rt.config import parse_config
from stream_rt.graph import Backoff, Context
from stream_rt.pipeline import build_pipeline
from stream_rt.sinks.mqtt import MqttSettings, MqttSink
from stream_rt.testing import ListSource

from .processes import Broker, RecordProperty, make_certificates


@pytest.fixture
def broker(free_port: int, tmp_path: Path) -> Iterator[Broker]:
    b = Broker(free_port, tmp_path)
    b.start()
    yield b
    b.kill()


class Subscriber:
    """Collects every message under a prefix with paho-mqtt in its own thread: a message is
    recorded in the callback, before its acknowledgement goes back, and the session is
    persistent (QoS 1) and reconnects by itself, so nothing is lost on this side."""

    def __init__(self, port: int, topic: str = "stream_rt/#") -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.connected = asyncio.Event()
        loop = asyncio.get_running_loop()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-subscriber-{port}", clean_session=False)
        client.reconnect_delay_set(0.05, 0.2)

        def on_connect(c: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
            c.subscribe(topic, qos=1)
            loop.call_soon_threadsafe(self.connected.set)

        def on_message(c: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))

        client.on_connect, client.on_message = on_connect, on_message
        client.connect_async("127.0.0.1", port)
        client.loop_start()
        self._client = client

    def payloads(self, suffix: str) -> list[dict[str, object]]:
        return [json.loads(p) for t, p, _ in list(self.messages) if t.endswith(suffix)]

    async def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def settings(port: int, tmp_path: Path) -> MqttSettings:
    return MqttSettings(port=port, outbox=tmp_path / "outbox.sqlite", backoff=Backoff(0.1, 0.5, 0.1))


async def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_replay_publishes_its_events_and_status_with_the_documented_topics(
    samples: Path, broker: Broker, tmp_path: Path
) -> None:
    subscriber = Subscriber(broker.port)
    await asyncio.wait_for(subscriber.connected.wait(), 5)
    config = parse_config({"sources": [{"id": "walkway", "url": str(samples / "still_motion.mkv"), "audio": False}],
                           "graph": LOSSLESS})  # fmt: skip
    pipeline = build_pipeline(config, speed=None)
    pipeline.graph.add(MqttSink("mqtt", settings(broker.port, tmp_path)))
    pipeline.graph.connect("trigger.events", "mqtt.in", capacity=64)
    pipeline.graph.connect("walkway.status", "mqtt.in")
    await pipeline.graph.run()
    await wait_until(lambda: len(subscriber.payloads("/events")) >= 6, 5, "the events")
    await subscriber.close()

    topics = {t for t, _, _ in subscriber.messages}
    assert {"stream_rt/available", "stream_rt/walkway/events", "stream_rt/walkway/status"} <= topics
    assert b"online" in [p for t, p, _ in subscriber.messages if t == "stream_rt/available"]
    events = subscriber.payloads("/walkway/events")
    assert [e["type"] for e in events].count("new") == 3 and [e["type"] for e in events].count("end") == 3
    first = events[0]
    assert first["kind"] == "Event" and first["source_id"] == "walkway" and first["event_id"].startswith("walkway-")
    assert {"start_pts_ns", "pts_ns", "wall_ns", "score", "components", "regions", "call_model"} <= set(first)
    status = subscriber.payloads("/walkway/status")
    assert status[0]["state"] == "online"


def event(i: int) -> Event:
    s = Salience("cam", i, i * 1_000_000, 0, 0.9, {"visual": 0.9})
    return Event("cam", i, s.pts_ns, 0, "update", f"cam-{i}", 0, None, 0.9, 0.9, s.components, (), True)


def feed_graph(sink: MqttSink, ids: range, drain_timeout_s: float = 5.0, feed: type[ListSource] | None = None) -> Graph:
    """A graph that feeds the events with these ids to ``sink`` (through a ``feed``, by
    default :class:`SlowFeed`)."""
    graph = Graph(clock=ReplayClock(None), drain_timeout_s=drain_timeout_s)
    graph.add((feed or SlowFeed)("feed", [event(i) for i in ids]))
    graph.add(sink)
    graph.connect("feed.out", "mqtt.in", capacity=64)
    return graph


class SlowFeed(ListSource):
    """Emits events at a steady pace, so a broker outage falls in the middle of the burst."""

    outputs = {"out": (Event,)}

    async def run(self, ctx: Context) -> None:
        for i, packet in enumerate(self.packets):
            await ctx.emit("out", packet)
            if i % 50 == 49:
                await asyncio.sleep(0.01)


async def test_broker_killed_mid_burst_loses_no_event(
    free_port: int, tmp_path: Path, record_property: RecordProperty
) -> None:
    broker = Broker(free_port, tmp_path, persistent=True)
    broker.start()
    subscriber = Subscriber(broker.port)
    await asyncio.wait_for(subscriber.connected.wait(), 5)
    await asyncio.sleep(1.2)  # the broker has saved the subscriber's session
    sink = MqttSink("mqtt", settings(broker.port, tmp_path), drain_timeout_s=20)
    graph = feed_graph(sink, range(1500), drain_timeout_s=20)
    run = asyncio.create_task(graph.run())
    await wait_until(lambda: len(subscriber.messages) > 200, 10, "the burst to start")
    broker.kill(signal.SIGKILL)
    # The sink notices at once, not when its pending acknowledgements time out.
    reconnects = lambda: graph.statistics()["nodes"]["mqtt"].get("mqtt_reconnects", 0)  # noqa: E731
    await wait_until(lambda: reconnects() >= 1, 2, "the sink to notice the broker is gone")
    await asyncio.sleep(0.5)
    broker.start()
    restarted = asyncio.get_running_loop().time()
    published = sink.published
    try:
        await wait_until(lambda: sink.published > published, 10, "the sink to publish again")
        record_property("recovery_s", round(asyncio.get_running_loop().time() - restarted, 3))
        await asyncio.wait_for(run, 30)
        await wait_until(lambda: len({e["event_id"] for e in subscriber.payloads("/events")}) >= 1500, 10, "events")
    finally:
        await subscriber.close()
        broker.kill()
    ids = {e["event_id"] for e in subscriber.payloads("/events")}
    record_property("lost", 1500 - len(ids))
    assert ids == {f"cam-{i}" for i in range(1500)}, f"{1500 - len(ids)} events lost"


async def test_starting_while_the_broker_is_down_delivers_once_it_is_up(free_port: int, tmp_path: Path) -> None:
    broker = Broker(free_port, tmp_path)
    sink = MqttSink("mqtt", settings(free_port, tmp_path), drain_timeout_s=20)
    graph = feed_graph(sink, range(100), drain_timeout_s=20)
    run = asyncio.create_task(graph.run())
    await asyncio.sleep(1.0)
    assert not sink.connected and not run.done()
    try:
        broker.start()
        subscriber = Subscriber(broker.port)
        await asyncio.wait_for(run, 30)
        await wait_until(lambda: len(subscriber.payloads("/events")) >= 100, 10, "the events")
        await subscriber.close()
    finally:
        broker.kill()
    assert {e["event_id"] for e in subscriber.payloads("/events")} == {f"cam-{i}" for i in range(100)}


async def test_undelivered_events_survive_a_restart_in_the_outbox(free_port: int, tmp_path: Path) -> None:
    # No broker at all: the run ends with everything still in the outbox ...
    graph = feed_graph(MqttSink("mqtt", settings(free_port, tmp_path), drain_timeout_s=0.2), range(30))
    await graph.run()
    # ... and the next process delivers it, in order, before anything new.
    broker = Broker(free_port, tmp_path)
    broker.start()
    try:
        subscriber = Subscriber(broker.port)
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        graph = feed_graph(
            MqttSink("mqtt", settings(free_port, tmp_path), drain_timeout_s=10), range(30, 40), drain_timeout_s=10
        )
        await graph.run()
        await wait_until(lambda: len(subscriber.payloads("/events")) >= 40, 10, "the events")
        await subscriber.close()
    finally:
        broker.kill()
    assert [e["event_id"] for e in subscriber.payloads("/events")] == [f"cam-{i}" for i in range(40)]


async def test_replay_with_an_mqtt_sink_in_the_config(samples: Path, broker: Broker, tmp_path: Path) -> None:
    subscriber = Subscriber(broker.port, "site/cams/#")
    await asyncio.wait_for(subscriber.connected.wait(), 5)
    config = tmp_path / "mqtt.toml"
    config.write_text(
        f'[sinks.mqtt]\nport = {broker.port}\nprefix = "site/cams"\noutbox = "{tmp_path / "outbox.sqlite"}"\n'
        "stats_interval_s = 0.2\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream_rt.cli", "replay", str(samples / "still_motion.mkv"), "--config", str(config),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    await wait_until(lambda: len(subscriber.payloads("/still_motion/events")) >= 6, 5, "the events")
    await subscriber.close()
    assert [e["type"] for e in subscriber.payloads("/still_motion/events")].count("new") == 3
    assert ("site/cams/available", b"online", False) in subscriber.messages
    stats = subscriber.payloads("site/cams/stats")
    assert stats and {"nodes", "edges"} <= set(stats[-1]) and "still_motion" in stats[-1]["nodes"]


async def test_a_broker_with_passwords_accepts_the_right_ones_and_names_the_refusal(
    free_port: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(tmp_path / "passwd"), "camera", "s3cret"], check=True)
    broker = Broker(free_port, tmp_path, auth=tmp_path / "passwd")
    broker.start()
    try:
        for attempt, (password, expect) in enumerate((("s3cret", True), ("guess", False))):
            outbox = tmp_path / f"outbox-{attempt}.sqlite"
            sink = MqttSink("mqtt", replace(settings(free_port, tmp_path), username="camera", password=password,
                                            outbox=outbox), drain_timeout_s=1.5)  # fmt: skip
            graph = feed_graph(sink, range(5))
            await graph.run()
            delivered = sink.published == 5
            assert delivered == expect
            counters = graph.statistics()["nodes"]["mqtt"]
            assert ("mqtt_auth_refused" in counters) != expect
    finally:
        broker.kill()
    refusals = [r.getMessage() for r in caplog.records if "refused user 'camera'" in r.getMessage()]
    assert len(refusals) == 1, "one clear line per outage, not one per retry"
    assert "check the username and password" in refusals[0] and "guess" not in caplog.text, "no secret in logs"


async def test_outbox_depth_is_counted_while_the_broker_is_away(free_port: int, tmp_path: Path) -> None:
    graph = feed_graph(MqttSink("mqtt", settings(free_port, tmp_path), drain_timeout_s=0.1), range(25))
    await graph.run()
    assert graph.statistics()["nodes"]["mqtt"]["outbox_depth"] == 25


async def test_tls_with_a_client_certificate(free_port: int, tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    broker = Broker(free_port, tmp_path, tls=certs)
    broker.start()
    try:
        for attempt, with_cert in enumerate((True, False)):
            tls = replace(
                settings(free_port, tmp_path),
                outbox=tmp_path / f"outbox-{attempt}.sqlite",
                tls_ca=certs / "ca.crt",
                tls_cert=certs / "client.crt" if with_cert else None,
                tls_key=certs / "client.key" if with_cert else None,
            )
            sink = MqttSink("mqtt", tls, drain_timeout_s=1.5)
            graph = feed_graph(sink, range(5))
            await graph.run()
            assert (sink.published == 5) == with_cert, "the broker requires a client certificate"
    finally:
        broker.kill()


async def test_answers_go_to_the_answers_topic_keyed_by_event_id(broker: Broker, tmp_path: Path) -> None:
    subscriber = Subscriber(broker.port)
    await asyncio.wait_for(subscriber.connected.wait(), 5)
    answer = MllmAnswer("cam", 7, 0, 0, "cam-3", "What moved?", "ok", {"summary": "a person"}, "{}", "m", smoke=True)
    graph = Graph(clock=ReplayClock(None))
    feed = ListSource("feed", [event(3), answer])
    feed.outputs = {"out": (Event, MllmAnswer)}
    graph.add(feed)
    graph.add(MqttSink("mqtt", settings(broker.port, tmp_path)))
    graph.connect("feed.out", "mqtt.in")
    await graph.run()
    await wait_until(lambda: subscriber.payloads("/cam/answers"), 5, "the answer")
    await subscriber.close()
    [published] = subscriber.payloads("/cam/answers")
    assert published["event_id"] == "cam-3" and published["answer"] == {"summary": "a person"}
    assert "not meaningful" in str(published["smoke"])
    assert [e["event_id"] for e in subscriber.payloads("/cam/events")] == ["cam-3"]

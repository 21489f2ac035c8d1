"""The MQTT sink against a real mosquitto: topics, payloads, and nothing lost when the
broker goes away."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import paho.mqtt.client as mqtt
import pytest

from stream_rt import Event, Graph, MllmAnswer, Packet, ReplayClock, SourceStatus, WatchState
from stream_rt.config import LOSSLESS_CHANNELS as LOSSLESS
from stream_rt.config import MqttSinkConfig, parse_config
from stream_rt.graph import Backoff, Context, ManualClock
from stream_rt.pipeline import build_pipeline
from stream_rt.policies.control import EpisodeControls, SourceControl
from stream_rt.sinks.mqtt import MqttSink
from stream_rt.sinks.mqtt.delivery import Delivery
from stream_rt.testing import Broker, ListSource, Subscriber, feed_graph, make_certificates, numbered_event

from .processes import RecordProperty


@pytest.fixture
def broker(free_port: int, tmp_path: Path) -> Iterator[Broker]:
    b = Broker(free_port, tmp_path)
    b.start()
    yield b
    b.kill()


FAST = Backoff(0.1, 0.5, 0.1)
"""Reconnects paced for tests that restart the broker."""


def settings(port: int, tmp_path: Path, **changes: object) -> MqttSinkConfig:
    return MqttSinkConfig.model_validate({"port": port, "outbox": tmp_path / "outbox.sqlite", **changes})


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


async def test_broker_killed_mid_burst_loses_no_event(
    free_port: int, tmp_path: Path, record_property: RecordProperty
) -> None:
    broker = Broker(free_port, tmp_path, persistent=True)
    broker.start()
    subscriber = Subscriber(broker.port)
    await asyncio.wait_for(subscriber.connected.wait(), 5)
    await asyncio.sleep(1.2)  # the broker has saved the subscriber's session
    sink = MqttSink("mqtt", settings(broker.port, tmp_path), drain_timeout_s=20, backoff=FAST)
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
    sink = MqttSink("mqtt", settings(free_port, tmp_path), drain_timeout_s=20, backoff=FAST)
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
            sink = MqttSink("mqtt", settings(free_port, tmp_path, username="camera", password=password, outbox=outbox),
                            drain_timeout_s=1.5, backoff=FAST)  # fmt: skip
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
            tls = settings(
                free_port,
                tmp_path,
                outbox=tmp_path / f"outbox-{attempt}.sqlite",
                tls_ca=certs / "ca.crt",
                tls_cert=certs / "client.crt" if with_cert else None,
                tls_key=certs / "client.key" if with_cert else None,
            )
            sink = MqttSink("mqtt", tls, drain_timeout_s=1.5, backoff=FAST)
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
    feed = ListSource("feed", [numbered_event(3), answer])
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


def retained(port: int, topics: list[str], timeout: float = 5.0, count: int | None = None) -> dict[str, bytes]:
    """What a subscriber connecting now receives as retained on ``topics`` (each a filter),
    once ``count`` topics (default: one per filter) have arrived or ``timeout`` passed."""
    got: dict[str, bytes] = {}

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.retain:
            got[message.topic] = bytes(message.payload)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    for topic in topics:
        client.subscribe(topic, qos=1)
    client.loop_start()
    deadline = time.monotonic() + timeout
    while len(got) < (count or len(topics)) and time.monotonic() < deadline:
        time.sleep(0.05)
    client.loop_stop()
    client.disconnect()
    return got


class Scripted(ListSource):
    """Emits what the test puts in its queue, and stays up (like a camera) until stopped."""

    outputs = {"out": (Event, MllmAnswer, SourceStatus, WatchState)}

    def __init__(self, name: str, queue: asyncio.Queue[Packet]) -> None:
        super().__init__(name, [])
        self.queue = queue

    async def run(self, ctx: Context) -> None:
        while True:
            await ctx.emit("out", await self.queue.get())


async def test_every_retained_state_is_current_after_a_broker_restart(free_port: int, tmp_path: Path) -> None:
    """A broker restarted without persistence has forgotten every retained message: each
    one is published again, with the current value, after the backlog of older ones."""
    broker = Broker(free_port, tmp_path)
    broker.start()
    queue: asyncio.Queue[Packet] = asyncio.Queue()
    control = SourceControl(EpisodeControls())
    sink = MqttSink("mqtt", settings(free_port, tmp_path, home_assistant=True), commands=control,
                    sources={"gate"}, drain_timeout_s=2, backoff=FAST)  # fmt: skip
    graph = Graph(clock=ReplayClock(None), drain_timeout_s=2)
    graph.add(Scripted("feed", queue))
    graph.add(sink)
    graph.connect("feed.out", "mqtt.in", capacity=64)
    run = asyncio.create_task(graph.run())
    subscriber = Subscriber(free_port, "stream_rt/#")
    opened = dataclasses.replace(numbered_event(1), source_id="gate", type="new", event_id="gate-1")
    watch = WatchState("gate", 2, 0, 0, "guests", "met", 5, "gate-1", "two people", "guests arrive", "answers")
    try:
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        for packet in (SourceStatus("gate", 0, 0, 0, streams=("video",)), opened, watch):
            queue.put_nowait(packet)
        await wait_until(lambda: subscriber.payloads("/gate/watch/guests"), 5, "the first states")
        broker.kill()
        await asyncio.sleep(0.5)
        # While the broker is away the episode ends and a new one opens: a backlog of older states.
        queue.put_nowait(dataclasses.replace(opened, type="end", seq=3))
        queue.put_nowait(dataclasses.replace(opened, seq=4, event_id="gate-2"))
        await asyncio.sleep(0.3)
        received = len(subscriber.messages)
        broker.start()  # no persistence: it has forgotten every retained message
        topics = ["available", "gate/status", "gate/available", "gate/activity", "gate/enabled/state",
                  "gate/watch/guests"]  # fmt: skip
        expected = {"available": b"online", "gate/available": b"online", "gate/activity": b"ON",
                    "gate/enabled/state": b"ON"}  # fmt: skip
        await wait_until(lambda: [t for t, _, _ in subscriber.messages[received:]].count("stream_rt/gate/activity")
                         >= 2, 20, "the backlog to arrive")  # fmt: skip
        await asyncio.sleep(0.5)
        filters = [f"stream_rt/{t}" for t in topics] + ["homeassistant/#"]
        kept = await asyncio.to_thread(retained, free_port, filters, 5.0, len(topics) + 5)  # 5 discovery configs
        after = subscriber.messages[received:]
    finally:
        await subscriber.close()
        graph.stop()
        await asyncio.wait_for(run, 10)
        broker.kill()
    kept = {t.removeprefix("stream_rt/"): p for t, p in kept.items()}
    assert set(topics) <= set(kept), f"not republished: {set(topics) - set(kept)}"
    assert {t: kept[t] for t in expected} == expected
    assert json.loads(kept["gate/status"])["state"] == "online"
    assert json.loads(kept["gate/watch/guests"])["state"] == "met"
    assert sum(t.startswith("homeassistant/") for t in kept) == 5, "the discovery configs too (the watch's as well)"
    last = {t.removeprefix("stream_rt/"): p for t, p, _ in after}  # the last one received on each topic
    assert {t: last[t] for t in expected} == expected, "the last state received is the current one"


async def test_a_broker_going_away_mid_run_is_not_called_a_credentials_problem(
    free_port: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Broker(free_port, tmp_path)
    broker.start()
    queue: asyncio.Queue[Packet] = asyncio.Queue()
    sink = MqttSink("mqtt", settings(free_port, tmp_path), drain_timeout_s=0.5, backoff=FAST)
    graph = Graph(clock=ReplayClock(None), drain_timeout_s=0.5)
    graph.add(Scripted("feed", queue))
    graph.add(sink)
    graph.connect("feed.out", "mqtt.in", capacity=64)
    run = asyncio.create_task(graph.run())
    reconnects = lambda: graph.statistics()["nodes"]["mqtt"].get("mqtt_reconnects", 0)  # noqa: E731
    try:
        queue.put_nowait(numbered_event(1))
        await wait_until(lambda: sink.published == 1, 5, "the first event")
        broker.kill()
        await asyncio.sleep(0.3)
        queue.put_nowait(numbered_event(2))  # published to a broker that has gone
        await wait_until(lambda: reconnects() >= 2, 15, "the sink to retry")
    finally:
        graph.stop()
        await asyncio.wait_for(run, 10)
        broker.kill()
    lines = [r.getMessage() for r in caplog.records if r.name == "stream_rt.mqtt"]
    assert not [line for line in lines if "username and password" in line], lines
    assert "mqtt_auth_refused" not in graph.statistics()["nodes"]["mqtt"]
    assert any(f"127.0.0.1:{free_port}" in line and ("lost" in line or "reach" in line) for line in lines), lines


def new_delivery(tmp_path: Path) -> tuple[Delivery, Context]:
    """The MQTT sink's delivery of an outbox in ``tmp_path``, open, with a context to send in."""
    delivery = Delivery(tmp_path / "outbox.sqlite", window=8, closing=asyncio.Event())
    delivery.open()
    return delivery, Context("mqtt", ManualClock(), {}, {}, asyncio.Event())


async def send_once(delivery: Delivery, ctx: Context, port: int) -> None:
    """Connect, let the delivery send until the outbox is empty and the states are out, stop."""
    async with aiomqtt.Client("127.0.0.1", port) as client:
        sending = asyncio.create_task(delivery.send(client, ctx))
        await wait_until(lambda: delivery.outbox is not None and delivery.outbox.depth() == 0, 10, "the outbox")
        await asyncio.sleep(0.3)
        delivery.closing.set()
        await sending
    delivery.closing.clear()


async def test_a_state_that_changes_while_the_backlog_goes_out_arrives_once(free_port: int, tmp_path: Path) -> None:
    """Retained states are published again once the connect's backlog is out; one that
    changed while that backlog was in flight is still queued in the outbox and goes out
    from there, once, in its turn."""
    broker = Broker(free_port, tmp_path)
    broker.start()
    subscriber = Subscriber(free_port)
    await asyncio.wait_for(subscriber.connected.wait(), 5)
    delivery, ctx = new_delivery(tmp_path)
    for i in range(200):  # the backlog waiting at the connect
        delivery.add(f"stream_rt/old/events/{i}", b"x", retain=False)
    try:
        async with aiomqtt.Client("127.0.0.1", free_port) as client:
            sending = asyncio.create_task(delivery.send(client, ctx))
            await asyncio.sleep(0.01)  # the first window is in flight
            delivery.add("stream_rt/cam/activity", b"ON", retain=True)
            await wait_until(lambda: delivery.outbox is not None and delivery.outbox.depth() == 0, 10, "the outbox")
            await asyncio.sleep(0.5)
            delivery.closing.set()
            await sending
    finally:
        delivery.close()
        await subscriber.close()
        broker.kill()
    assert [p for t, p, _ in subscriber.messages if t == "stream_rt/cam/activity"] == [b"ON"]


async def test_states_kept_across_a_reopened_outbox_are_published_again(free_port: int, tmp_path: Path) -> None:
    """A sink restarted by its supervision reopens its outbox, which numbers its messages
    afresh: the states it keeps are still published again on the next connect, to a broker
    that restarted without persistence and forgot them."""
    broker = Broker(free_port, tmp_path)
    broker.start()
    delivery, ctx = new_delivery(tmp_path)
    try:
        delivery.add("stream_rt/cam/activity", b"ON", retain=True)
        await send_once(delivery, ctx, free_port)
        delivery.close()  # the sink's stop and start
        delivery.open()
        broker.kill()
        broker.start()
        await send_once(delivery, ctx, free_port)
        kept = await asyncio.to_thread(retained, free_port, ["stream_rt/cam/activity"])
    finally:
        delivery.close()
        broker.kill()
    assert kept == {"stream_rt/cam/activity": b"ON"}


async def test_a_stop_while_a_window_waits_for_acknowledgements_ends_the_delivery_cleanly(
    free_port: int, tmp_path: Path
) -> None:
    """Stopping while the broker has not acknowledged the window in flight (a slow link;
    here a paused broker) ends the delivery normally, so the goodbye can follow, and the
    unacknowledged messages stay in the outbox."""
    broker = Broker(free_port, tmp_path)
    broker.start()
    assert broker.proc is not None
    delivery, ctx = new_delivery(tmp_path)
    try:
        async with aiomqtt.Client("127.0.0.1", free_port) as client:
            broker.proc.send_signal(signal.SIGSTOP)
            for i in range(20):
                delivery.add(f"stream_rt/cam/events/{i}", b"x", retain=False)
            sending = asyncio.create_task(delivery.send(client, ctx))
            await asyncio.sleep(0.3)  # the first window is handed to the client, unacknowledged
            delivery.closing.set()
            await asyncio.wait_for(sending, 5)  # returns: no CancelledError out of a stop
            assert delivery.outbox is not None and delivery.outbox.depth() == 20
    finally:
        delivery.close()
        broker.proc.send_signal(signal.SIGCONT)
        broker.kill()

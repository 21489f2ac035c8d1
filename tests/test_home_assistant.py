"""Home Assistant MQTT discovery through a real broker: each camera's entities are
announced, retained, in the shape Home Assistant's MQTT integration documents, and their
state topics carry what the entities show — also to a Home Assistant that connects later
(the last answer and the last snapshot are retained)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from pathlib import Path
from typing import Literal

import av
import numpy as np
import numpy.typing as npt
import paho.mqtt.publish as mqtt_publish
import paho.mqtt.subscribe as mqtt_subscribe
import pytest
from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field

from stream_rt import Event, Graph, MllmAnswer, Packet, ReplayClock, SourceStatus, VideoFrame, WatchState
from stream_rt.graph import Context
from stream_rt.media.images import decode_image, rgb_luma
from stream_rt.policies.asks import AskQueue
from stream_rt.policies.control import EpisodeControls, SourceControl
from stream_rt.sinks.commands import Question as CommandQuestion
from stream_rt.sinks.mqtt import MqttSink
from stream_rt.sinks.mqtt.home_assistant import discovery_messages
from stream_rt.testing import Broker, ListSource, Subscriber, feed_graph, numbered_event

from .test_mqtt import FAST, Scripted, retained, settings, wait_until

# The keys Home Assistant's MQTT discovery documents for these entities (its schema allows
# more; these are the ones a payload must have right to be accepted and grouped).
TOPIC = r"^[^#+]+$"  # a topic to publish to: no wildcards


class Availability(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topic: str = Field(pattern=TOPIC)


class Device(BaseModel):
    model_config = ConfigDict(extra="allow")
    identifiers: list[str] = Field(min_length=1)
    name: str


class Entity(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    unique_id: str = Field(pattern=r"^[a-zA-Z0-9_-]+$")
    availability: list[Availability] = Field(min_length=1)
    availability_mode: Literal["all", "any", "latest"]
    device: Device
    origin: dict[str, str]


class BinarySensor(Entity):
    state_topic: str = Field(pattern=TOPIC)
    device_class: Literal["motion", "occupancy", "presence"]


class Switch(Entity):
    command_topic: str = Field(pattern=TOPIC)
    state_topic: str = Field(pattern=TOPIC)


class Sensor(Entity):
    state_topic: str = Field(pattern=TOPIC)
    value_template: str
    json_attributes_topic: str = Field(pattern=TOPIC)


class EnumSensor(Sensor):
    device_class: Literal["enum"]
    options: list[str] = Field(min_length=1)


class Image(Entity):
    image_topic: str = Field(pattern=TOPIC)  # the image's bytes (HA's other way, url_topic, is not used)
    content_type: Literal["image/jpeg"]


class Text(Entity):
    command_topic: str = Field(pattern=TOPIC)
    command_template: str
    min: int = Field(ge=0, le=255)
    max: int = Field(ge=1, le=255)  # Home Assistant's limit
    mode: Literal["text", "password"]


SCHEMAS: dict[str, type[Entity]] = {"binary_sensor": BinarySensor, "switch": Switch, "sensor": Sensor, "image": Image,
                                    "text": Text}  # fmt: skip
DISCOVERY_TOPIC = re.compile(r"^homeassistant/(\w+)/([a-zA-Z0-9_-]+)/([a-zA-Z0-9_-]+)/config$")


class Camera(ListSource):
    """Says the camera is online, then opens and ends an episode, then stays up."""

    outputs = {"out": (Event, SourceStatus)}

    async def run(self, ctx: Context) -> None:
        await ctx.emit("out", SourceStatus("gate", 0, 0, 0))
        opened = dataclasses.replace(numbered_event(1), source_id="gate", type="new", event_id="gate-1")
        await ctx.emit("out", opened)
        await asyncio.sleep(0.3)
        await ctx.emit("out", dataclasses.replace(opened, type="end", seq=2))
        await asyncio.Event().wait()


async def test_cameras_appear_in_home_assistant_without_yaml(free_port: int, tmp_path: Path) -> None:
    broker = Broker(free_port, tmp_path)
    broker.start()
    trigger = SourceControl(EpisodeControls())
    sink = MqttSink("mqtt", settings(free_port, tmp_path, home_assistant=True),
                    commands=trigger, sources={"gate", "back_yard"})  # fmt: skip
    graph = feed_graph(sink, range(0), drain_timeout_s=2, feed=Camera)
    run = asyncio.create_task(graph.run())
    subscriber = Subscriber(free_port, "#")
    try:
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        configs = lambda: [m for m in subscriber.messages if m[0].startswith("homeassistant/")]  # noqa: E731
        await wait_until(lambda: len(configs()) == 8, 10, "four entities for each of two cameras")
        devices: dict[str, set[str]] = {}
        for topic, payload, _ in configs():
            match = DISCOVERY_TOPIC.match(topic)
            assert match, topic
            entity = SCHEMAS[match[1]].model_validate(json.loads(payload))
            devices.setdefault(entity.device.identifiers[0], set()).add(match[1])
            assert {a.topic for a in entity.availability} <= {"stream_rt/available", "stream_rt/gate/available",
                                                             "stream_rt/back_yard/available"}  # fmt: skip
        kinds = {"binary_sensor", "switch", "sensor", "image"}  # no text to ask: no model answers here
        assert len(devices) == 2 and all(k == kinds for k in devices.values()), devices

        def texts(topic: str) -> list[str]:
            return [p.decode() for t, p, _ in list(subscriber.messages) if t == topic]

        await wait_until(lambda: len(texts("stream_rt/gate/activity")) == 2, 5, "the episode to open and end")
        assert texts("stream_rt/gate/activity") == ["ON", "OFF"]
        assert texts("stream_rt/gate/available") == ["online"]
        assert texts("stream_rt/gate/enabled/state") == ["ON"]
        send = lambda: mqtt_publish.single("stream_rt/gate/enabled/set", b"OFF", qos=1, hostname="127.0.0.1",  # noqa: E731
                                           port=free_port)  # fmt: skip
        await asyncio.to_thread(send)
        await wait_until(lambda: len(texts("stream_rt/gate/enabled/state")) == 2, 5, "the switch's new state")
        assert texts("stream_rt/gate/enabled/state")[-1] == "OFF" and not trigger.is_enabled("gate")
        # What Home Assistant finds when it starts later: all of it, retained.
        kept = await asyncio.to_thread(
            mqtt_subscribe.simple, ["homeassistant/#", "stream_rt/gate/#"], msg_count=12, retained=True,
            hostname="127.0.0.1", port=free_port,
        )  # fmt: skip
        retained = {m.topic: m.payload.decode() for m in kept}
        assert sum(t.startswith("homeassistant/") for t in retained) == 8
        states = {t.removeprefix("stream_rt/gate/"): retained[t] for t in retained if t.startswith("stream_rt/gate/")}
        assert {k: states[k] for k in ("activity", "enabled/state", "available")} == {
            "activity": "OFF", "enabled/state": "OFF", "available": "online"}  # fmt: skip
    finally:
        await subscriber.close()
        graph.stop()
        await asyncio.wait_for(run, 10)
        broker.kill()


def test_the_answer_sensor_shows_the_summary_or_the_status() -> None:
    [template] = [p["value_template"] for t, p in discovery_messages("stream_rt", ["gate"]) if "/sensor/" in t]
    render = lambda answer: Template(template).render(value_json=answer)  # noqa: E731
    assert render({"status": "ok", "answer": {"summary": "a van parks"}}) == "a van parks"
    assert render({"status": "timeout", "answer": None}) == "timeout"
    assert len(render({"status": "ok", "answer": {"summary": "x" * 400}})) == 255


def first_frame(path: Path) -> npt.NDArray[np.uint8]:
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


async def test_the_snapshot_the_last_answer_a_question_and_each_watch_reach_home_assistant(
    samples: Path, free_port: int, tmp_path: Path
) -> None:
    """The entities Frigate users have: the last event's snapshot (an image), a text to ask
    the camera, a sensor per standing watch; and what a Home Assistant connecting after it
    all happened finds retained: the last answer (not a later 'dropped', which answered
    nothing), the last snapshot, the watch set now (the one it replaced removed)."""
    broker = Broker(free_port, tmp_path)
    broker.start()
    queue: asyncio.Queue[Packet] = asyncio.Queue()
    asks = AskQueue()
    control = SourceControl(EpisodeControls(), asks)
    sink = MqttSink("mqtt", settings(free_port, tmp_path, home_assistant=True), sources={"gate"}, asks=True,
                    commands=control, watches={"gate": "guests"}, backoff=FAST)  # fmt: skip
    graph = Graph(clock=ReplayClock(None), drain_timeout_s=2)
    graph.add(Scripted("feed", queue))
    graph.add(sink)
    graph.connect("feed.out", "mqtt.in", capacity=64)
    run = asyncio.create_task(graph.run())
    rgb = first_frame(samples / "vtest.avi")
    frame = VideoFrame("gate", 1, 0, 0, rgb_luma(rgb), lambda: rgb)
    opened = Event("gate", 2, 0, 0, "new", "gate-1", 0, None, 0.9, 0.9, {"visual": 0.9}, (), True, frame=frame)
    answer = {"summary": "a man walks to the door", "condition_met": False, "action": "none", "confidence": 0.8}
    answered = MllmAnswer("gate", 2, 0, 0, "gate-1", "What is happening?", "ok", answer, json.dumps(answer), "m")
    dropped = MllmAnswer("gate", 3, 0, 0, "gate-1", "What is happening?", "dropped", None, "", "m")
    removed = WatchState("gate", 4, 0, 0, "guests", "removed", 5, "", "", "guests arrive", "removed")
    parcel = WatchState("gate", 5, 0, 0, "parcel", "unmet", 6, "", "", "a parcel is at the door", "set")
    subscriber = Subscriber(free_port, "homeassistant/#")
    try:
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        for packet in (SourceStatus("gate", 0, 0, 0, streams=("video",)), opened, answered, dropped, removed, parcel):
            queue.put_nowait(packet)
        await wait_until(lambda: any(t.endswith("watch_parcel/config") for t, _, _ in subscriber.messages), 10,
                         "the new watch's sensor")  # fmt: skip
        await wait_until(lambda: sink._outbox is not None and sink._outbox.depth() == 0, 10, "the outbox to empty")
        # Home Assistant starting now.
        kept = await asyncio.to_thread(retained, free_port, ["homeassistant/#", "stream_rt/gate/#"], 5.0, 14)

        # What Home Assistant publishes when someone types a question: the text, through its
        # command template, on the command topic; the daemon queues exactly that question.
        text = Text.model_validate(json.loads(kept["homeassistant/text/stream_rt_gate/ask/config"]))
        question = 'Is the "parcel" at the door? C:\\mail\n{{ not a template }} </script> — ünïcode'
        payload = ImmutableSandboxedEnvironment().from_string(text.command_template).render(value=question)
        await asyncio.to_thread(mqtt_publish.single, text.command_topic, payload.encode(), qos=1,
                                hostname="127.0.0.1", port=free_port)  # fmt: skip
        await wait_until(lambda: asks.waiting("gate") == 1, 5, "the question to be queued")
        [queued] = asks.take("gate")
        assert queued.question == question
    finally:
        await subscriber.close()
        graph.stop()
        await asyncio.wait_for(run, 10)
        broker.kill()

    configs = {t: json.loads(p) for t, p in kept.items() if t.startswith("homeassistant/")}
    expected = {f"homeassistant/{kind}/stream_rt_gate/{key}/config" for kind, key in (
        ("binary_sensor", "activity"), ("switch", "enabled"), ("sensor", "answer"), ("image", "snapshot"),
        ("text", "ask"), ("sensor", "watch_parcel"))}  # fmt: skip
    assert set(configs) == expected, "the replaced watch's sensor is removed (its config emptied)"
    for topic, config in configs.items():
        match = DISCOVERY_TOPIC.match(topic)
        assert match
        schema = EnumSensor if match[3].startswith("watch_") else SCHEMAS[match[1]]
        entity = schema.model_validate(config)
        assert entity.device.identifiers == ["stream_rt_gate"]

    image = Image.model_validate(configs["homeassistant/image/stream_rt_gate/snapshot/config"])
    snapshot = decode_image(kept[image.image_topic]).to_ndarray(format="rgb24")
    assert snapshot.shape == rgb.shape and np.abs(snapshot.astype(int) - rgb).mean() < 6, "the event's frame"

    sensor = Sensor.model_validate(configs["homeassistant/sensor/stream_rt_gate/answer/config"])
    assert sensor.state_topic == sensor.json_attributes_topic == "stream_rt/gate/last_answer"
    last = json.loads(kept[sensor.state_topic])
    assert last["status"] == "ok" and last["answer"] == answer and last["event_id"] == "gate-1"
    assert Template(sensor.value_template).render(value_json=last) == "a man walks to the door"

    watch = EnumSensor.model_validate(configs["homeassistant/sensor/stream_rt_gate/watch_parcel/config"])
    state = json.loads(kept[watch.state_topic])
    rendered = Template(watch.value_template).render(value_json=state)
    assert rendered == "unmet" and rendered in watch.options


@pytest.mark.parametrize("question", ['say "hi"', "two\nlines", "back\\slash", "tab\there", "<b>&amp;</b>", "x" * 255])
def test_the_ask_text_becomes_the_ask_commands_json(question: str) -> None:
    """Home Assistant's text entity publishes what was typed, as it is: its command template
    makes the JSON the ask command takes, whatever the text holds."""
    [config] = [p for t, p in discovery_messages("stream_rt", ["gate"]) if "/text/" in t]
    payload = ImmutableSandboxedEnvironment().from_string(config["command_template"]).render(value=question)
    assert json.loads(payload) == {"question": question}
    assert CommandQuestion.model_validate_json(payload).question == question


async def test_snapshots_do_not_pile_up_while_the_broker_is_away(samples: Path, free_port: int, tmp_path: Path) -> None:
    """Every event waits in the outbox for the broker; of the snapshots only the newest
    does (a retained state whose history matters to no one), and it is what the broker
    keeps once it is back."""
    queue: asyncio.Queue[Packet] = asyncio.Queue()
    sink = MqttSink("mqtt", settings(free_port, tmp_path), sources={"gate"}, backoff=FAST)
    graph = Graph(clock=ReplayClock(None), drain_timeout_s=2)
    graph.add(Scripted("feed", queue))
    graph.add(sink)
    graph.connect("feed.out", "mqtt.in", capacity=64)
    run = asyncio.create_task(graph.run())
    with av.open(str(samples / "vtest.avi")) as container:
        pictures = [f.to_ndarray(format="rgb24") for _, f in zip(range(40), container.decode(video=0), strict=False)]
    pictures = pictures[::4]  # ten frames, people moving between them
    broker = Broker(free_port, tmp_path)
    try:
        for i, rgb in enumerate(pictures):
            frame = VideoFrame("gate", 2 * i, 0, 0, rgb_luma(rgb), lambda rgb=rgb: rgb)
            queue.put_nowait(Event("gate", 2 * i + 1, i, 0, "update", "gate-1", 0, None, 0.9, 0.9, {}, (), True,
                                   frame=frame))  # fmt: skip
        await wait_until(lambda: sink._outbox is not None and sink._outbox.depth() >= len(pictures) + 1, 10, "all in")
        await asyncio.sleep(0.3)
        assert sink._outbox is not None
        waiting = [m.topic for m in sink._outbox.pending(1000)]
        assert waiting.count("stream_rt/gate/events") == len(pictures), "every event waits"
        assert waiting.count("stream_rt/gate/snapshot") == 1, "one snapshot waits: the newest"
        broker.start()
        await wait_until(lambda: sink._outbox is not None and sink._outbox.depth() == 0, 15, "the outbox to empty")
        kept = await asyncio.to_thread(retained, free_port, ["stream_rt/gate/snapshot"])
    finally:
        graph.stop()
        await asyncio.wait_for(run, 10)
        broker.kill()
    snapshot = decode_image(kept["stream_rt/gate/snapshot"]).to_ndarray(format="rgb24").astype(int)
    errors = [np.abs(snapshot - rgb).mean() for rgb in pictures]
    assert int(np.argmin(errors)) == len(pictures) - 1, f"the last event's frame: {errors}"

"""Home Assistant MQTT discovery through a real broker: each camera's entities are
announced, retained, in the shape Home Assistant's MQTT integration documents, and their
state topics carry what the entities show."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from pathlib import Path
from typing import Literal

import paho.mqtt.publish as mqtt_publish
import paho.mqtt.subscribe as mqtt_subscribe
from pydantic import BaseModel, ConfigDict, Field

from stream_rt import Event, SourceStatus
from stream_rt.graph import Context
from stream_rt.policies.control import EpisodeControls, SourceControl
from stream_rt.sinks.mqtt import MqttSink
from stream_rt.testing import Broker, ListSource, Subscriber, feed_graph, numbered_event

from .test_mqtt import settings, wait_until

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


SCHEMAS: dict[str, type[Entity]] = {"binary_sensor": BinarySensor, "switch": Switch, "sensor": Sensor}
DISCOVERY_TOPIC = re.compile(r"^homeassistant/(binary_sensor|switch|sensor)/([a-zA-Z0-9_-]+)/([a-zA-Z0-9_-]+)/config$")


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
        await wait_until(lambda: len(configs()) == 6, 10, "three entities for each of two cameras")
        devices: dict[str, set[str]] = {}
        for topic, payload, _ in configs():
            match = DISCOVERY_TOPIC.match(topic)
            assert match, topic
            entity = SCHEMAS[match[1]].model_validate(json.loads(payload))
            devices.setdefault(entity.device.identifiers[0], set()).add(match[1])
            assert {a.topic for a in entity.availability} <= {"stream_rt/available", "stream_rt/gate/available",
                                                             "stream_rt/back_yard/available"}  # fmt: skip
        assert len(devices) == 2 and all(kinds == set(SCHEMAS) for kinds in devices.values()), devices

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
            mqtt_subscribe.simple, ["homeassistant/#", "stream_rt/gate/#"], msg_count=10, retained=True,
            hostname="127.0.0.1", port=free_port,
        )  # fmt: skip
        retained = {m.topic: m.payload.decode() for m in kept}
        assert sum(t.startswith("homeassistant/") for t in retained) == 6
        states = {t.removeprefix("stream_rt/gate/"): retained[t] for t in retained if t.startswith("stream_rt/gate/")}
        assert {k: states[k] for k in ("activity", "enabled/state", "available")} == {
            "activity": "OFF", "enabled/state": "OFF", "available": "online"}  # fmt: skip
    finally:
        await subscriber.close()
        graph.stop()
        await asyncio.wait_for(run, 10)
        broker.kill()


def test_the_answer_sensor_shows_the_summary_or_the_status() -> None:
    from jinja2 import Template

    from stream_rt.sinks.mqtt.home_assistant import discovery_messages

    [template] = [p["value_template"] for t, p in discovery_messages("stream_rt", ["gate"]) if "/sensor/" in t]
    render = lambda answer: Template(template).render(value_json=answer)  # noqa: E731
    assert render({"status": "ok", "answer": {"summary": "a van parks"}}) == "a van parks"
    assert render({"status": "timeout", "answer": None}) == "timeout"
    assert len(render({"status": "ok", "answer": {"summary": "x" * 400}})) == 255

"""Commands on <prefix>/<source>/<feature>/set: validated, applied, answered; bad ones change
nothing — checked directly and through a real broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import paho.mqtt.publish as mqtt_publish
import pytest

from stream_rt import Event, Graph, Packet, ReplayClock, Salience
from stream_rt.config import TriggerConfig
from stream_rt.graph import Context
from stream_rt.policies.asks import AskLedger, AskQueue
from stream_rt.policies.control import EpisodeControls, SourceControl
from stream_rt.policies.trigger import TriggerPolicy
from stream_rt.sinks.commands import MAX_PAYLOAD, CommandError, apply_command
from stream_rt.sinks.mqtt import MqttSink
from stream_rt.testing import Broker, ListSource, Subscriber, feed_graph

from .test_mqtt import settings, wait_until


def thresholds(control: SourceControl, source: str) -> tuple[float | None, float | None, bool]:
    """What commands set for ``source``: on, off (None: not set) and enabled."""
    return control.episodes.overrides(source)


@pytest.mark.parametrize(
    "feature,payload,error",
    [
        ("trigger", b'{"on": "high"}', "on: Input should be a valid number"),
        ("trigger", b'{"on": 0.2, "off": 0.6}', "off <= on"),
        ("trigger", b'{"on": 2}', "less than or equal to 1"),
        ("trigger", b'{"gain": 3}', "Extra inputs are not permitted"),
        ("trigger", b"{}", "give 'on' and/or 'off'"),
        ("trigger", b"[1, 2", "JSON object"),
        ("enabled", b"maybe", "takes ON or OFF"),
        ("enabled", b"\xff\xfe", "not UTF-8"),
        ("enabled", b"ON" + b" " * MAX_PAYLOAD, "over the 4096-byte limit"),
        ("zoom", b"2", "unknown feature 'zoom'"),
        ("ask", b"what is there?", "JSON object"),
        ("ask", b'{"question": ""}', "at least 1 character"),
        ("ask", b'{"question": 42}', "valid string"),
        ("ask", b'{"question": "' + b"why " * 300 + b'"}', "at most 1000 characters"),
        ("watch", b"guests please", "takes OFF or a JSON object"),
        ("watch", b'{"id": "guests"}', "condition: Field required"),
        ("watch", b'{"id": "a b", "condition": "x"}', "id: String should match pattern"),
        ("watch", b'{"id": "g", "condition": "x", "expires_s": -1}', "greater than or equal to 0"),
        ("watch", b'{"id": "g", "condition": "x", "every": 3}', "Extra inputs are not permitted"),
        ("watch", b"OFF", "has no watch"),
        ("watch", b'{"id": "g", "condition": "x", "recheck_s": 1e400}', "finite number"),
        ("watch", b'{"id": "g", "condition": "x", "expires_s": 1e300}', "less than or equal to"),
        ("watch", b'{"id": "set", "condition": "x"}', "'set' cannot be a watch id"),
        ("watch", b'{"id": "g", "condition": "   "}', "should match pattern"),
    ],
)
def test_bad_commands_are_rejected_and_change_nothing(feature: str, payload: bytes, error: str) -> None:
    from stream_rt.policies.watches import WatchBook

    trigger = SourceControl(EpisodeControls(), AskQueue(), WatchBook())
    with pytest.raises(CommandError, match=error.replace("(", r"\(").replace("[", r"\[")):
        apply_command(trigger, {"gate"}, "gate", feature, payload)
    assert thresholds(trigger, "gate") == (None, None, True)
    assert trigger.asks is not None and not trigger.asks.waiting("gate")
    assert trigger.watches is not None and not trigger.watches.all() and not trigger.watches.take()


def test_unknown_sources_are_rejected() -> None:
    with pytest.raises(CommandError, match="unknown source 'garage'"):
        apply_command(SourceControl(EpisodeControls()), {"gate"}, "garage", "enabled", b"OFF")


def test_good_commands_are_applied() -> None:
    trigger = SourceControl(EpisodeControls(TriggerConfig(on=0.5, off=0.3)))
    assert apply_command(trigger, {"gate"}, "gate", "trigger", b'{"on": 0.8}') == {"applied": "trigger {'on': 0.8}"}
    assert thresholds(trigger, "gate") == (0.8, 0.3, True)
    apply_command(trigger, {"gate"}, "gate", "enabled", b"off")
    assert thresholds(trigger, "gate")[2] is False


class Waiting(ListSource):
    """A source that stays up (like a camera) until the graph is stopped."""

    outputs = {"out": (Event,)}

    async def run(self, ctx: Context) -> None:
        await asyncio.Event().wait()


async def test_commands_over_a_real_broker(free_port: int, tmp_path: Path) -> None:
    broker = Broker(free_port, tmp_path)
    broker.start()
    trigger = SourceControl(EpisodeControls())
    sink = MqttSink("mqtt", settings(free_port, tmp_path), commands=trigger, sources={"gate"})
    graph = feed_graph(sink, range(0), drain_timeout_s=2, feed=Waiting)
    run = asyncio.create_task(graph.run())
    subscriber = Subscriber(free_port, "stream_rt/#")
    try:
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        await wait_until(lambda: sink.connected, 5, "the sink to connect")
        await asyncio.sleep(0.2)
        send = lambda topic, payload: mqtt_publish.single(topic, payload, qos=1, hostname="127.0.0.1", port=free_port)  # noqa: E731
        await asyncio.to_thread(send, "stream_rt/gate/trigger/set", b'{"on": "very"}')
        await asyncio.to_thread(send, "stream_rt/gate/trigger/set", b"\xff" * 10_000)
        await asyncio.to_thread(send, "stream_rt/gate/trigger/set", b'{"on": 0.7, "off": 0.4}')
        await wait_until(lambda: len(subscriber.payloads("/gate/status")) >= 3, 5, "the answers")
        answers = subscriber.payloads("/gate/status")
        assert [a["ok"] for a in answers] == [False, False, True]
        assert "Input should be a valid number" in str(answers[0]["error"])
        assert "4096-byte limit" in str(answers[1]["error"])
        assert thresholds(trigger, "gate") == (0.7, 0.4, True)
        assert not run.done(), "the daemon keeps running after bad commands"
    finally:
        await subscriber.close()
        graph.stop()
        await asyncio.wait_for(run, 10)
        broker.kill()
    counters = graph.statistics()["nodes"]["mqtt"]
    assert counters["commands_rejected"] == 2 and counters["commands_applied"] == 1


async def test_a_disabled_source_ends_its_episode_and_opens_none() -> None:
    from stream_rt.testing import run_node

    packets = [Salience("gate", i, i * 100_000_000, 0, 0.9, {"visual": 0.9}) for i in range(30)]

    class Toggle(TriggerPolicy):
        def step(self, s: Salience, ctx: Context) -> list[Event]:
            if s.seq == 10:
                self.controls.set_enabled("gate", False)
            return super().step(s, ctx)

    out = await run_node(Toggle("trigger"), packets)
    events = [p for p in out["events"] if isinstance(p, Event)]
    assert [(e.type, e.reason) for e in events] == [("new", ""), ("end", "disabled")]


async def test_a_question_becomes_an_ask_event_at_the_next_salience() -> None:
    from stream_rt.testing import run_node

    packets = [Salience("gate", i, i * 100_000_000, 0, 0.1, {"visual": 0.1}) for i in range(5)]
    asks = AskQueue()
    trigger = TriggerPolicy("trigger", asks=asks)
    reply = apply_command(SourceControl(trigger.controls, asks), {"gate"}, "gate", "ask",
                          b'{"question": " Is the gate open? "}')  # fmt: skip
    out = await run_node(trigger, packets)
    events = [p for p in out["events"] if isinstance(p, Event)]
    assert [(e.type, e.event_id, e.question, e.call_model, e.pts_ns) for e in events] == [
        ("ask", reply["event_id"], "Is the gate open?", True, 0)
    ], "a quiet scene opens no episode, but the question is asked once, at the first frame"


def test_a_question_that_cannot_be_kept_is_refused_not_acknowledged() -> None:
    ask = b'{"question": "Is the gate open?"}'
    with pytest.raises(CommandError, match=r"no model is configured"):
        apply_command(SourceControl(EpisodeControls()), {"gate"}, "gate", "ask", ask)
    ledger = AskLedger(max_open=3)
    asks = AskQueue(ledger)
    trigger = SourceControl(EpisodeControls(), asks)
    ids = [apply_command(trigger, {"gate", "door"}, "gate", "ask", ask)["event_id"] for _ in range(3)]
    with pytest.raises(CommandError, match=r"3 questions about 'gate' are still waiting for their answers"):
        apply_command(trigger, {"gate", "door"}, "gate", "ask", ask)
    assert apply_command(trigger, {"gate", "door"}, "door", "ask", ask)["event_id"], "another source has room"
    ledger.release("gate", ids[0])  # its answer went out
    assert apply_command(trigger, {"gate", "door"}, "gate", "ask", ask)["event_id"] not in ids
    asks.source_offline("gate")  # as the trigger does when the source's status says so
    with pytest.raises(CommandError, match=r"source 'gate' is offline"):
        apply_command(trigger, {"gate", "door"}, "gate", "ask", ask)


async def test_an_outage_ends_the_episode_and_sends_the_waiting_questions() -> None:
    from stream_rt import SourceStatus
    from stream_rt.testing import run_node

    def busy(i: int) -> Salience:
        return Salience("gate", i, i * 100_000_000, 0, 0.9, {"visual": 0.9})

    class Outage(TriggerPolicy):
        """Feeds itself an offline status after step 20 and an online one after step 25,
        in order with the salience, as the fusion passes them on."""

        async def process(self, packet: Packet, ctx: Context) -> None:
            await super().process(packet, ctx)
            if packet.seq == 20:
                assert self.asks is not None
                self.asks.ask("gate", "What was there?")
                await self.on_control(SourceStatus("gate", -1, -1, 0, "offline", "no frame for 10 s"), ctx)
            if packet.seq == 25:
                await self.on_control(SourceStatus("gate", -1, -1, 0, "online", "back"), ctx)

    packets = [busy(i) for i in range(40)]  # steps 21-25: decoded before the outage, arriving after it
    trigger = Outage("trigger", asks=AskQueue())
    out = await run_node(trigger, packets)
    events = [p for p in out["events"] if isinstance(p, Event)]
    kinds = [(e.type, e.reason) for e in events]
    assert kinds == [("new", ""), ("ask", "ask"), ("end", "source_offline"), ("new", ""), ("end", "end_of_stream")]
    first, ask, end, second = events[0], events[1], events[2], events[3]
    assert end.event_id == first.event_id and end.end_pts_ns == 20 * 100_000_000
    assert ask.frame is None and ask.pts_ns == 20 * 100_000_000, "asked about the last step before the outage"
    assert second.event_id != first.event_id and second.start_pts_ns > 25 * 100_000_000
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)), "every event has its own, increasing sequence number"
    assert len({e.event_id for e in events}) == 3


async def test_questions_without_steps_go_out_after_ask_wait_s_and_none_is_lost_at_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A source sends one step, then nothing: its questions go out after ask_wait_s about
    that step's frame — while other sources appear meanwhile (the deadline pass must not
    trip over them) and while the graph stops (what is being sent still goes out)."""
    import time

    import numpy as np

    import stream_rt.policies.trigger as trigger_module
    from stream_rt import CallbackSink, VideoFrame

    encode = trigger_module.encode_jpeg

    def slow_encode(frame: VideoFrame) -> bytes:
        time.sleep(0.3)  # a snapshot of a big frame on a busy machine
        return encode(frame)

    monkeypatch.setattr(trigger_module, "encode_jpeg", slow_encode)
    frame = VideoFrame("gate", 0, 0, 0, np.full((48, 64), 128, np.uint8))

    class OneStep(ListSource):
        outputs = {"out": (Salience,)}

        async def run(self, ctx: Context) -> None:
            await ctx.emit("out", Salience("gate", 0, 0, 0, 0.1, {"visual": 0.1}, (), frame))
            await asyncio.Event().wait()  # up, silent, until stopped

    graph = Graph(clock=ReplayClock(None), drain_timeout_s=3)
    asks = AskQueue(clock=graph.clock)
    trigger = TriggerPolicy("trigger", TriggerConfig(ask_wait_s=0.2, snapshot=True), asks=asks)
    got: list[Event] = []
    graph.add(OneStep("feed", []))
    graph.add(trigger)
    graph.add(CallbackSink("sink", got.append))  # type: ignore[arg-type]
    graph.connect("feed.out", "trigger.salience")
    graph.connect("trigger.events", "sink.in")
    run = asyncio.create_task(graph.run())
    await wait_until(lambda: "gate" in trigger._states, 5, "the step")
    first = asks.ask("gate", "Is the gate open?")
    await asyncio.sleep(0.35)  # the deadline pass is encoding the snapshot now
    asks.source_online("door")  # another source appears meanwhile
    await wait_until(lambda: [e.event_id for e in got] == [first], 5, "the first question")
    second = asks.ask("gate", "And now?")
    await asyncio.sleep(0.35)
    graph.stop()  # while its snapshot is being encoded
    await asyncio.wait_for(run, 10)
    asks = [e for e in got if e.type == "ask"]
    assert [e.event_id for e in asks] == [first, second], "every acknowledged question went out"
    assert all(e.frame is frame and e.snapshot_jpeg for e in asks), "about the last frame the source sent"
    assert graph.statistics()["nodes"]["trigger"]["asks_without_step"] == 2

#!/usr/bin/env python3
"""MQTT delivery: events per second through the durable outbox and a real broker at QoS 1,
beside raw aiomqtt publishing of the same payloads in the same run, and events lost
across broker restarts.

1. Throughput: ``--events`` events through a graph (feed -> MqttSink: SQLite outbox,
   publish window, PUBACK, delete) against a bare aiomqtt client publishing the same
   payloads with the same window of QoS 1 publishes, to a mosquitto on a loopback port.
   Rounds alternate; the ratio is the median of per-round ratios. Target >= 0.5.
2. Loss: the same stream while the broker is SIGKILLed and restarted three times, counted
   by event id at a subscriber (paho, persistent session). Target 0 lost.

Usage: python benchmarks/mqtt.py [--events 3000] [--rounds 5]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiomqtt

from stream_rt.config import MqttSinkConfig
from stream_rt.graph import Backoff
from stream_rt.sinks.mqtt import MqttSink
from stream_rt.testing import Broker, Subscriber, feed_graph, free_port, numbered_event

WINDOW = 64


async def through_sink(port: int, workdir: Path, count: int, offset: int) -> float:
    config = MqttSinkConfig(port=port, outbox=workdir / f"outbox-{offset}.sqlite")
    sink = MqttSink("mqtt", config, drain_timeout_s=60, backoff=Backoff(0.1, 0.5, 0.1), publish_window=WINDOW)
    graph = feed_graph(sink, range(offset, offset + count), drain_timeout_s=60)
    started = time.perf_counter()
    await graph.run()
    assert sink.published >= count
    return count / (time.perf_counter() - started)


async def raw_aiomqtt(port: int, count: int, offset: int) -> float:
    payloads = [
        json.dumps(numbered_event(offset + i).to_record(), separators=(",", ":")).encode() for i in range(count)
    ]
    started = time.perf_counter()
    async with aiomqtt.Client("127.0.0.1", port) as client:
        for start in range(0, count, WINDOW):
            await asyncio.gather(
                *(client.publish("stream_rt/cam/events", p, qos=1) for p in payloads[start : start + WINDOW])
            )
    return count / (time.perf_counter() - started)


def newest_id(subscriber: Subscriber) -> list[int]:
    return [int(str(e["event_id"]).rsplit("-", 1)[1]) for e in subscriber.payloads("/events")]


async def loss_across_restarts(workdir: Path, count: int, restarts: int) -> dict[str, float]:
    port = free_port()
    broker = Broker(port, workdir, persistent=True)
    broker.start()
    subscriber = Subscriber(port)
    await asyncio.wait_for(subscriber.connected.wait(), 5)
    await asyncio.sleep(1.2)  # the broker has saved the subscriber's session
    run = asyncio.create_task(through_sink(port, workdir, count, offset=10_000_000))
    recoveries = []
    for k in range(restarts):
        target = (k + 1) * count // (restarts + 2)
        while len(subscriber.messages) < target and not run.done():
            await asyncio.sleep(0.01)
        broker.kill()
        await asyncio.sleep(0.5)
        down = time.perf_counter()
        # Recovered once the sink publishes again: an id beyond anything the broker could
        # have held before the kill (the last id seen plus two publish windows).
        fresh = max(newest_id(subscriber), default=0) + 2 * WINDOW
        broker.start()
        while max(newest_id(subscriber), default=0) <= fresh and not run.done():
            await asyncio.sleep(0.005)
        recoveries.append(time.perf_counter() - down)
    await asyncio.wait_for(run, 120)
    deadline = time.perf_counter() + 10
    expected = {f"cam-{10_000_000 + i}" for i in range(count)}
    while time.perf_counter() < deadline:
        got = {e["event_id"] for e in subscriber.payloads("/events")}
        if expected <= got:
            break
        await asyncio.sleep(0.05)
    await subscriber.close()
    broker.kill()
    got = {e["event_id"] for e in subscriber.payloads("/events")}
    return {
        "loss_events": count,
        "loss_restarts": restarts,
        "lost": len(expected - got),
        "duplicates": len(subscriber.payloads("/events")) - len(got),
        "recovery_s_max": round(max(recoveries), 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        port = free_port()
        broker = Broker(port, workdir)
        broker.start()
        try:
            ours, raw, ratios = [], [], []
            for r in range(args.rounds):
                offset = r * args.events
                if r % 2 == 0:
                    a = await raw_aiomqtt(port, args.events, offset)
                    b = await through_sink(port, workdir, args.events, offset)
                else:
                    b = await through_sink(port, workdir, args.events, offset)
                    a = await raw_aiomqtt(port, args.events, offset)
                raw.append(a)
                ours.append(b)
                ratios.append(b / a)
        finally:
            broker.kill()
        (workdir / "loss").mkdir()
        loss = await loss_across_restarts(workdir / "loss", args.events, restarts=3)
    result = {
        "events": args.events,
        "sink_events_per_s": round(statistics.median(ours), 1),
        "raw_aiomqtt_per_s": round(statistics.median(raw), 1),
        "ratio": round(statistics.median(ratios), 3),
        **loss,
    }
    print(f"outbox + broker, QoS 1 : {result['sink_events_per_s']:8.0f} events/s")
    print(f"raw aiomqtt, QoS 1     : {result['raw_aiomqtt_per_s']:8.0f} messages/s")
    print(f"ratio                  : {result['ratio']:8.3f} (target >= 0.5)")
    print(f"3 broker SIGKILLs      : {loss['lost']} of {args.events} events lost (target 0), "
          f"{loss['duplicates']} duplicates, recovery <= {loss['recovery_s_max']} s")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())

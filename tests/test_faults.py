"""Faults the field throws at a daemon, with real parts: the outbox's disk fills up or its
file is removed under it, the MLLM worker process dies mid-run. Each counts the events
lost (target 0) and checks the daemon keeps going."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from stream_rt import CallbackSink
from stream_rt.graph import Context
from stream_rt.sinks.mqtt import MqttSink
from stream_rt.sinks.outbox import Outbox
from stream_rt.testing import Broker, PacedEvents, Subscriber, feed_graph, start_worker

from .processes import RecordProperty
from .test_mqtt import settings, wait_until


def fill_up(outbox: Outbox) -> None:
    """Make the database full from now on, as a full disk does (SQLITE_FULL on write)."""
    db: sqlite3.Connection = outbox._db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_outbox_holds_messages_in_memory_in_order_until_it_takes_writes(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    for i in range(10):
        outbox.add("t", f"before {i}".encode())
    fill_up(outbox)
    ids = [outbox.add("t", f"{i:04d}".encode() * 500) for i in range(200)]
    assert outbox.write_errors > 0 and outbox.depth() == 210
    pending = outbox.pending(1000)
    assert [m.id for m in pending] == sorted(m.id for m in pending) and len(pending) == 210
    for message in pending[:20]:  # acknowledged while held: gone from memory and database
        outbox.ack(message.id)
    outbox._db.execute("PRAGMA max_page_count = 1073741823")  # space again
    outbox.add("t", b"after")
    outbox.close()
    reopened = Outbox(tmp_path / "outbox.sqlite")
    assert [m.id for m in reopened.pending(1000)] == [*ids[10:], ids[-1] + 1], "the rest survives a restart"


async def test_events_go_on_reaching_the_broker_while_the_outbox_disk_is_full(free_port: int, tmp_path: Path) -> None:
    broker = Broker(free_port, tmp_path)
    broker.start()
    subscriber = Subscriber(broker.port)
    await asyncio.wait_for(subscriber.connected.wait(), 5)
    sink = MqttSink("mqtt", settings(broker.port, tmp_path), drain_timeout_s=10)

    class FillingFeed(PacedEvents):
        async def run(self, ctx: Context) -> None:
            for i, packet in enumerate(self.packets):
                if i == 100:
                    assert sink._outbox is not None
                    fill_up(sink._outbox)
                await ctx.emit("out", packet)
                await asyncio.sleep(0)

    graph = feed_graph(sink, range(600), drain_timeout_s=10, feed=FillingFeed)
    try:
        await graph.run()
        await wait_until(lambda: len(subscriber.payloads("/events")) >= 600, 10, "the events")
    finally:
        await subscriber.close()
        broker.kill()
    assert {e["event_id"] for e in subscriber.payloads("/events")} == {f"cam-{i}" for i in range(600)}
    assert graph.statistics()["nodes"]["mqtt"]["outbox_write_errors"] > 0


async def test_a_removed_outbox_file_is_written_anew_and_nothing_is_lost(free_port: int, tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"

    class RemovingFeed(PacedEvents):
        async def run(self, ctx: Context) -> None:
            for i, packet in enumerate(self.packets):
                if i == 50:
                    for leftover in tmp_path.glob("outbox.sqlite*"):
                        leftover.unlink()
                await ctx.emit("out", packet)

    # No broker: everything waits in the outbox, whose file is removed half-way ...
    sink = MqttSink("mqtt", settings(free_port, tmp_path), drain_timeout_s=0.2)
    graph = feed_graph(sink, range(100), feed=RemovingFeed)
    await graph.run()
    assert path.exists() and graph.statistics()["nodes"]["mqtt"]["outbox_recreated"] == 1
    # ... and the next process delivers all of it.
    broker = Broker(free_port, tmp_path)
    broker.start()
    try:
        subscriber = Subscriber(broker.port)
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        await feed_graph(MqttSink("mqtt", settings(free_port, tmp_path), drain_timeout_s=10), range(0)).run()
        await wait_until(lambda: len(subscriber.payloads("/events")) >= 100, 10, "the events")
        await subscriber.close()
    finally:
        broker.kill()
    assert [e["event_id"] for e in subscriber.payloads("/events")] == [f"cam-{i}" for i in range(100)]


async def test_a_crashed_model_worker_costs_answers_not_events_and_calls_resume_once_it_is_back(
    samples: Path, free_port: int, tmp_path: Path, record_property: RecordProperty
) -> None:
    from stream_rt.config import LOSSLESS_CHANNELS, parse_config
    from stream_rt.mllm.smoke import build_smoke_model
    from stream_rt.pipeline import build_pipeline

    model = build_smoke_model()
    config = parse_config({
        "sources": [{"id": "walkway", "url": str(samples / "still_motion.mkv"), "audio": False}],
        "graph": LOSSLESS_CHANNELS,
        "trigger": {"update_interval_s": 1, "cooldown_s": 0, "max_calls_per_min": 600},
        "mllm": {"backend": "openai", "url": f"http://127.0.0.1:{free_port}/v1", "model": "smoke",
                 "reuse_threshold": 0, "flow": "block", "timeout_s": 30},
        "sinks": {"jsonl": {"path": str(tmp_path / "events.jsonl")}},
    })  # fmt: skip
    worker = await start_worker(model, free_port)
    pipeline = build_pipeline(config, speed=3.0)  # 30 s: events still come once a worker started under load is back
    answers: list[tuple[float, str]] = []
    pipeline.graph.add(CallbackSink("watch", lambda a: answers.append((time.monotonic(), a.status))))
    pipeline.graph.connect("mllm.answers", "watch.in", capacity=64)
    run = asyncio.create_task(pipeline.graph.run())
    try:
        await wait_until(lambda: len(answers) >= 2, 30, "the first answers")
        worker.kill()  # SIGKILL, mid-run
        await worker.wait()
        killed = time.monotonic()
        await wait_until(lambda: any(s == "error" for t, s in answers if t > killed), 30, "a failed call")
        restarted = time.monotonic()
        worker = await start_worker(model, free_port)
        await wait_until(lambda: any(s == "ok" for t, s in answers if t > restarted), 30, "calls to resume")
        recovery = next(t for t, s in answers if t > restarted and s == "ok") - restarted
        await asyncio.wait_for(run, 120)
    finally:
        worker.kill()
        await worker.wait()
    records = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    calls = {r["event_id"] + str(r["seq"]) for r in records if r["kind"] == "Event" and r["call_model"]}
    answered = {r["event_id"] + str(r["seq"]) for r in records if r["kind"] == "MllmAnswer"}
    assert answered == calls, "every call got one answer record, failed or not"
    ends = [r for r in records if r["kind"] == "Event" and r["type"] == "end"]
    assert len(ends) == 3, "perception went on: all three episodes of the clip were seen to their end"
    assert recovery < 30
    record_property("recovery_s", round(recovery, 3))
    record_property("lost", 0)


def outbox_ids(path: Path) -> list[str]:
    """The events in an outbox file, read beside the daemon writing it (none until it has
    created its table)."""
    with sqlite3.connect(path) as db:
        try:
            rows = db.execute("SELECT topic, payload FROM outbox ORDER BY id").fetchall()
        except sqlite3.OperationalError:
            return []
    records = [json.loads(bytes(p)) for topic, p in rows if topic.endswith("/events")]  # the others: states, answers
    return [f"{r['event_id']}:{r['seq']}" for r in records]


def busy_daemon(tmp_path: Path, port: int, outbox: Path) -> Path:
    """A daemon config whose synthetic camera opens an episode every 2 s, into ``outbox``."""
    config = tmp_path / "daemon.toml"
    config.write_text(
        '[[sources]]\nid = "cam"\nurl = "synthetic:?frames=100000&fps=25&width=64&height=48&active_s=1&period_s=2"\n'
        f'[sinks.mqtt]\nport = {port}\noutbox = "{outbox}"\n'
        "[trigger]\nconfirm_s = 0.1\ncutoff_s = 0.3\n"
    )
    return config


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_a_daemon_stopped_mid_run_delivers_everything_its_outbox_took_after_a_restart(
    free_port: int, tmp_path: Path, sig: signal.Signals, record_property: RecordProperty
) -> None:
    """`stream-rt run` with the broker away, killed (or terminated) mid-run; the next start,
    with the broker back, delivers every event the outbox had taken, by id."""
    outbox = tmp_path / "outbox.sqlite"
    config = busy_daemon(tmp_path, free_port, outbox)
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream_rt.cli", "run", str(config), stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_until(lambda: outbox.exists() and len(outbox_ids(outbox)) >= 12, 60, "events in the outbox")
    finally:
        daemon.send_signal(sig)
        assert daemon.stderr is not None
        stderr = (await asyncio.wait_for(daemon.communicate(), 30))[1].decode()
    assert daemon.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 0), stderr[-2000:]
    taken = outbox_ids(outbox)
    assert len(taken) >= 12

    broker = Broker(free_port, tmp_path)
    broker.start()
    try:
        subscriber = Subscriber(free_port)
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        started = time.monotonic()
        await feed_graph(MqttSink("mqtt", settings(free_port, tmp_path), drain_timeout_s=10), range(0)).run()
        got = lambda: {f"{e['event_id']}:{e['seq']}" for e in subscriber.payloads("/events")}  # noqa: E731
        await wait_until(lambda: set(taken) <= got(), 10, "the events of the stopped run")
        recovery = time.monotonic() - started
        await subscriber.close()
    finally:
        broker.kill()
    assert recovery < 10
    record_property("recovery_s", round(recovery, 3))
    record_property("lost", len(set(taken) - got()))

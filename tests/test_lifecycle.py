"""Events follow the sources' lives and keep their identity: ids never repeat across
replays, restarts or outages; an outage ends its episode; a daemon that stops leaves
its cameras offline on the broker."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from stream_rt.config import parse_config
from stream_rt.pipeline import build_pipeline
from stream_rt.testing import Broker, StreamServer, Subscriber

from .test_faults import busy_daemon, outbox_ids
from .test_live import wait_for
from .test_mqtt import retained, wait_until


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def events_of(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("kind") == "Event"]


def one_event_per_id(events: list[dict[str, Any]]) -> None:
    """No two different events share an id: every record of an id is the same episode (same
    source and start), and records with the same id and seq are the same message."""
    episodes: dict[str, set[tuple[str, int]]] = defaultdict(set)
    messages: dict[tuple[str, int], set[str]] = defaultdict(set)
    for e in events:
        episodes[e["event_id"]].add((e["source_id"], e["start_pts_ns"]))
        messages[(e["event_id"], e["seq"])].add(json.dumps(e, sort_keys=True))
    assert all(len(v) == 1 for v in episodes.values()), {k: v for k, v in episodes.items() if len(v) > 1}
    assert all(len(v) == 1 for v in messages.values())


def test_two_replays_of_one_clip_share_no_event_id(samples: Path, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    for _ in range(2):  # the same file, appended to
        cmd = [sys.executable, "-m", "stream_rt.cli", "replay", str(samples / "still_motion.mkv"), "--out", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    rows = records(out)
    ends = [i for i, r in enumerate(rows) if r["kind"] == "EndOfStream"]
    assert len(ends) == 2 and ends[-1] == len(rows) - 1, "one end of stream per replay, each its last record"
    first, second = events_of(rows[: ends[0]]), events_of(rows[ends[0] :])
    assert len({e["event_id"] for e in first}) == 3, "three episodes of motion"
    assert not {e["event_id"] for e in first} & {e["event_id"] for e in second}
    assert min(e["seq"] for e in second) > max(e["seq"] for e in first), "sequence numbers never repeat"
    one_event_per_id(first + second)
    for run in (first, second):
        assert all(e["event_id"].startswith("still_motion-") for e in run)
        assert [e["seq"] for e in run] == sorted({e["seq"] for e in run})


async def test_a_daemon_killed_and_restarted_with_its_outbox_full_never_reuses_an_id(
    free_port: int, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.sqlite"
    run = [sys.executable, "-m", "stream_rt.cli", "run", str(busy_daemon(tmp_path, free_port, outbox))]
    daemon = subprocess.Popen(run, stderr=subprocess.DEVNULL)  # the broker is not there yet
    try:
        await wait_until(lambda: outbox.exists() and len(outbox_ids(outbox)) >= 12, 60, "events in the outbox")
    finally:
        daemon.kill()
        daemon.wait(10)
    broker = Broker(free_port, tmp_path)
    broker.start()
    subscriber = Subscriber(free_port, "stream_rt/cam/events")
    daemon = subprocess.Popen(run, stderr=subprocess.DEVNULL)  # sends what was left, then new events

    def twins() -> int:
        """Media times at which an episode of each run opened (the synthetic media of both
        runs starts at 0 and repeats every 2 s): two episodes, so two ids."""
        ids: dict[int, set[str]] = defaultdict(set)
        for e in subscriber.payloads("/events"):
            ids[e["start_pts_ns"]].add(e["event_id"])
        return sum(len(v) == 2 for v in ids.values())

    try:
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        await wait_until(lambda: twins() >= 3, 30, "episodes of both runs at the same media times")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)
        await subscriber.close()
        broker.kill()
    one_event_per_id(subscriber.payloads("/events"))


async def test_an_outage_ends_the_episode_and_the_next_activity_is_a_new_one(
    server: StreamServer, free_port: int, tmp_path: Path
) -> None:
    out = tmp_path / "events.jsonl"
    config = parse_config({
        "sources": [{"id": "cam", "url": f"tcp://127.0.0.1:{free_port}", "audio": False, "stall_timeout_s": 2,
                     "reconnect": {"initial_s": 0.2, "max_s": 0.5}}],
        "sinks": {"jsonl": {"path": str(out)}},
    })  # fmt: skip
    pipeline = build_pipeline(config)
    run = asyncio.create_task(pipeline.graph.run())
    camera = pipeline.sources[0]
    news = lambda: [e for e in events_of(records(out)) if e["type"] == "new"] if out.exists() else []  # noqa: E731
    try:
        await wait_for(lambda: len(news()) == 1, 30, "an episode (people walk all the time)")
        server.kill()
        await wait_for(lambda: camera.state == "offline", 10, "the outage")
        await asyncio.sleep(1.0)
        server.start()
        await wait_for(lambda: len(news()) == 2, 30, "an episode after the camera is back")
    finally:
        pipeline.graph.stop()
        await asyncio.wait_for(run, 10)
    rows = records(out)
    events = events_of(rows)
    first, second = news()
    end = next(e for e in events if e["type"] == "end")
    assert end["event_id"] == first["event_id"] and end["reason"] == "source_offline"
    offline = next(i for i, r in enumerate(rows) if r["kind"] == "SourceStatus" and r["state"] == "offline")
    assert all(e["event_id"] != first["event_id"] for e in events_of(rows[offline + 1 :]) if e["type"] != "end")
    assert second["event_id"] != first["event_id"] and second["start_pts_ns"] > end["end_pts_ns"]
    one_event_per_id(events)


async def test_a_clean_stop_or_the_end_of_the_stream_leaves_offline_retained(
    samples: Path, free_port: int, tmp_path: Path
) -> None:
    broker = Broker(free_port, tmp_path)
    broker.start()
    topics = ["stream_rt/available", "stream_rt/walkway/status"]
    try:
        for how in ("SIGTERM", "end of stream"):
            config = tmp_path / "daemon.toml"
            speed = "1" if how == "SIGTERM" else "max"
            config.write_text(
                f'[[sources]]\nid = "walkway"\nurl = "{samples / "still_motion.mkv"}"\n'
                f'[sinks.mqtt]\nport = {free_port}\noutbox = "{tmp_path / "outbox.sqlite"}"\n'
            )
            daemon = subprocess.Popen([sys.executable, "-m", "stream_rt.cli", "run", str(config), "--speed", speed],
                                      stderr=subprocess.PIPE)  # fmt: skip
            if how == "SIGTERM":
                await wait_until(
                    lambda: json.loads(retained(free_port, topics).get(topics[1], b"{}")).get("state") == "online",
                    30, "the daemon online",
                )  # fmt: skip
                daemon.send_signal(signal.SIGTERM)
            _, stderr = daemon.communicate(timeout=120)
            assert daemon.returncode == 0, stderr.decode()[-2000:]
            left = await asyncio.to_thread(retained, free_port, topics)
            assert left["stream_rt/available"] == b"offline", how
            status = json.loads(left["stream_rt/walkway/status"])
            assert status["state"] == "offline" and status["detail"] == (
                "stream stopped" if how == "SIGTERM" else "end of stream"
            ), (how, status)
    finally:
        broker.kill()


async def test_a_source_that_ends_is_closed_while_the_others_go_on(samples: Path) -> None:
    """A file ends in a daemon that also has a camera still up: the file's open episode ends
    then (end_of_stream), not when the daemon stops, and it refuses new questions."""
    from stream_rt import CallbackSink, Event, PushSource
    from stream_rt.policies.asks import AskRefused

    camera = PushSource("robot")  # up, sending nothing
    config = parse_config({"sources": [{"id": "file", "url": str(samples / "vtest.avi"), "audio": False}],
                           "mllm": {"model": "smoke"}})  # fmt: skip
    pipeline = build_pipeline(config, speed=None, sources=[camera])
    events: list[Event] = []
    pipeline.graph.add(CallbackSink("events", events.append))  # type: ignore[arg-type]
    pipeline.graph.connect("trigger.events", "events.in", capacity=64)
    run = asyncio.create_task(pipeline.graph.run())
    file = next(s for s in pipeline.sources if s.name == "file")
    trigger = pipeline.control
    assert trigger is not None
    try:
        await wait_for(lambda: any(e.type == "end" for e in events), 60, "the file's episode to end")
        assert file.state == "ended" and not run.done(), "the daemon goes on with its camera"
        end = next(e for e in events if e.type == "end")
        assert end.reason == "end_of_stream" and end.source_id == "file" and end.end_pts_ns > 79e9
        try:
            trigger.ask("file", "What is there?")
            raise AssertionError("a question about an ended source was acknowledged")
        except AskRefused as exc:
            assert "has ended" in str(exc)
    finally:
        pipeline.graph.stop()
        await asyncio.wait_for(run, 20)
    assert [e.type for e in events].count("end") == 1


async def test_a_clean_stop_with_a_backlog_in_the_outbox_still_leaves_offline_retained(
    samples: Path, free_port: int, tmp_path: Path
) -> None:
    from stream_rt.sinks.outbox import Outbox

    outbox = Outbox(tmp_path / "outbox.sqlite")  # what an earlier run could not deliver
    for i in range(20_000):
        outbox.add(f"stream_rt/old/events/{i % 10}", b"x" * 200)
    outbox.close()
    broker = Broker(free_port, tmp_path)
    broker.start()
    topics = ["stream_rt/available", "stream_rt/walkway/status", "stream_rt/walkway/available"]
    config = tmp_path / "daemon.toml"
    config.write_text(
        f'[[sources]]\nid = "walkway"\nurl = "{samples / "vtest.avi"}"\n[graph]\ndrain_timeout_s = 1\n'
        f'[sinks.mqtt]\nport = {free_port}\noutbox = "{tmp_path / "outbox.sqlite"}"\n'
    )
    daemon = subprocess.Popen([sys.executable, "-m", "stream_rt.cli", "run", str(config)], stderr=subprocess.PIPE)
    try:
        await wait_until(lambda: retained(free_port, topics[:1]).get(topics[0]) == b"online", 30, "the daemon")
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=60)
        assert daemon.returncode == 0, stderr.decode()[-2000:]
        assert b"never retrieved" not in stderr, stderr.decode()[-2000:]
        left = await asyncio.to_thread(retained, free_port, topics)
    finally:
        broker.kill()
    assert Outbox(tmp_path / "outbox.sqlite").depth() > 0, "the backlog was still there at the stop"
    assert left["stream_rt/available"] == b"offline"
    assert json.loads(left["stream_rt/walkway/status"])["state"] == "offline"
    assert left["stream_rt/walkway/available"] == b"offline"

"""Standing watches: the condition goes with every routine call of its source, the state
flips only after N agreeing answers, transitions only are published (retained on the
broker, in the JSONL), a watch expires, and a restarted daemon keeps its state."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.subscribe as mqtt_subscribe
import pytest

from stream_rt.config import parse_config
from stream_rt.graph.packets import MllmAnswer
from stream_rt.pipeline import build_pipeline
from stream_rt.policies.watches import WatchBook
from stream_rt.testing import Broker, Subscriber, chat_server

from .test_mqtt import wait_until

CONDITION = "two people are on the walkway"


def answer(met: bool | None, question: str, event_id: str = "cam-1", status: str = "ok") -> MllmAnswer:
    body = {"summary": f"met={met}", "condition_met": met, "action": "none", "confidence": 1.0}
    return MllmAnswer("cam", 1, 0, 0, event_id, question, status, body, "", "m")  # type: ignore[arg-type]


def test_a_watch_flips_only_after_agreeing_answers_and_expires(tmp_path: Path) -> None:
    now = [1_000_000_000]
    book = WatchBook(tmp_path / "watches.json", clock=lambda: now[0])
    book.set("cam", "guests", CONDITION, expires_s=60, confirm=2)
    asked = book.question("cam", "What is happening?")
    assert asked.endswith(f"to check: {CONDITION} — say in condition_met whether it holds now.")
    assert book.question("other", "Q?") == "Q?"
    assert [(t.state, t.reason) for t in book.take()] == [("unmet", "set")]
    book.observe(answer(True, "an older question, asked before the watch"))  # does not count
    book.remove("cam")
    book.set("cam", "guests", CONDITION, expires_s=60, confirm=2)
    assert [t.state for t in book.take()] == ["removed", "unmet"]
    book.observe(answer(True, asked))  # asked of the watch set before: does not count either
    book.observe(answer(True, asked))
    assert book.of("cam").state == "unmet"  # type: ignore[union-attr]
    asked = book.question("cam", "What is happening?")
    for met in (True, False, True, None):  # never two in a row that agree on "met"
        book.observe(answer(met, asked))
    book.observe(answer(True, asked, status="invalid"))
    assert not book.take() and book.of("cam").state == "unmet"  # type: ignore[union-attr]
    book.observe(answer(True, asked, "cam-7"))
    flips = book.take()
    assert [(t.state, t.reason, t.event_id, t.summary) for t in flips] == [("met", "answers", "cam-7", "met=True")]
    book.observe(answer(True, asked))  # agreeing with "met": nothing new to publish
    assert not book.take()
    restarted = WatchBook(tmp_path / "watches.json", clock=lambda: now[0])
    watch = restarted.of("cam")
    assert watch is not None and (watch.state, watch.event_id) == ("met", "cam-7")
    restarted.set("cam", "guests", CONDITION, expires_s=60, confirm=2)  # the config read again: kept
    assert restarted.of("cam").state == "met" and not restarted.take()  # type: ignore[union-attr]
    now[0] += 59 * 10**9
    restarted.expire()
    assert not restarted.take()
    now[0] += 2 * 10**9
    restarted.expire()
    assert [t.state for t in restarted.take()] == ["expired"] and restarted.of("cam") is None
    assert restarted.question("cam", "Q?") == "Q?"
    assert json.loads((tmp_path / "watches.json").read_text()) == {"watches": [], "ended": []}


@pytest.fixture
async def scripted_model(free_port: int) -> AsyncIterator[tuple[str, list[str], list[bool]]]:
    """An OpenAI-compatible server whose answers' ``condition_met`` follow ``script`` (its
    last value repeated); it records each question it was asked."""
    questions: list[str] = []
    script: list[bool] = []

    def reply(body: dict[str, Any]) -> str:
        questions.append(next(p["text"] for p in body["messages"][-1]["content"] if p["type"] == "text"))
        met = script[min(len(questions), len(script)) - 1]
        return json.dumps({"summary": "two people" if met else "one person", "condition_met": met,
                           "action": "none", "confidence": 0.9})  # fmt: skip

    runner = await chat_server(free_port, reply)
    try:
        yield f"http://127.0.0.1:{free_port}/v1", questions, script
    finally:
        await runner.cleanup()


async def test_a_watch_is_asked_published_once_per_flip_and_survives_a_restart(
    scripted_model: tuple[str, list[str], list[bool]], samples: Path, tmp_path: Path
) -> None:
    url, questions, script = scripted_model
    from stream_rt.testing import free_port

    broker = Broker(free_port(), tmp_path)
    broker.start()
    subscriber = Subscriber(broker.port, "stream_rt/#")
    log = tmp_path / "events.jsonl"

    def config() -> object:
        return parse_config({
            "sources": [{"id": "cam", "url": str(samples / "vtest.avi"), "audio": False}],
            "trigger": {"update_interval_s": 2, "cooldown_s": 0, "max_calls_per_min": 600},
            "mllm": {"backend": "openai", "url": url, "model": "scripted", "flow": "block", "reuse_threshold": 0},
            "watches": [{"id": "guests", "source": "cam", "condition": CONDITION, "confirm": 2}],
            "watch_state": str(tmp_path / "watches.json"),
            "sinks": {"jsonl": {"path": str(log)}, "mqtt": {"port": broker.port, "outbox": str(tmp_path / "o.db")}},
        })  # fmt: skip

    def transitions() -> list[dict[str, object]]:
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        return [r for r in rows if r["kind"] == "WatchState"]

    try:
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        script[:] = [False, True]  # the first answer says unmet, every later one met
        await build_pipeline(config(), speed=None).graph.run()  # type: ignore[arg-type]
        assert len(questions) >= 3 and all(f"to check: {CONDITION}" in q for q in questions)
        first = transitions()
        assert [(t["state"], t["reason"]) for t in first] == [("unmet", "set"), ("met", "answers")]
        # The same thing said again in one episode is marked a repeat, not news.
        answers = [json.loads(line) for line in log.read_text().splitlines()]
        answers = [a for a in answers if a["kind"] == "MllmAnswer"]
        news = [(a["event_id"], a["answer"]["summary"]) for a in answers if not a["repeat"]]
        assert len(answers) == len(questions) > len(news) and len(set(news)) == len(news), news
        assert news[:2] == [(answers[0]["event_id"], "one person"), (answers[1]["event_id"], "two people")]
        topic = "stream_rt/cam/watch/guests"
        await wait_until(lambda: any(t == topic for t, _, _ in subscriber.messages), 10, "the watch on the broker")
        published = [json.loads(p) for t, p, _ in subscriber.messages if t == topic]
        assert [p["state"] for p in published] == ["unmet", "met"] and published[-1]["event_id"] == first[1]["event_id"]
        later = await asyncio.wait_for(asyncio.to_thread(  # a dashboard that connects later sees the state
            mqtt_subscribe.simple, topic, hostname="127.0.0.1", port=broker.port, retained=True), 10)  # fmt: skip
        assert later.retain and json.loads(later.payload)["state"] == "met"

        log.unlink()
        questions.clear()
        script[:] = [False]  # after the restart: unmet from then on
        await build_pipeline(config(), speed=None).graph.run()  # type: ignore[arg-type]
        assert [(t["state"], t["reason"]) for t in transitions()] == [("unmet", "answers")], "restored as met"
    finally:
        broker.kill()


async def test_an_unmet_watch_is_rechecked_without_salience_until_met() -> None:
    """Quiet view, watch with recheck_s = 1: a ``check`` event (calling the model) each
    second of media, sharing one id, taking nothing from the budget the arrival needs;
    none once the watch is met, and an episode's own calls replace them while it lasts."""
    from stream_rt.config import TriggerConfig
    from stream_rt.graph.packets import Event, Salience
    from stream_rt.policies.trigger import TriggerPolicy
    from stream_rt.testing import run_node

    book = WatchBook()
    book.set("cam", "guests", CONDITION, confirm=1, recheck_s=1.0)
    quiet = [Salience("cam", i, i * 100_000_000, 0, 0.0, {"visual": 0.0}) for i in range(35)]
    arrival = [Salience("cam", i, i * 100_000_000, 0, 0.9, {"visual": 0.9}) for i in range(35, 40)]
    out = await run_node(TriggerPolicy("trigger", TriggerConfig(max_calls_per_min=2), watches=book), quiet + arrival)
    events = [e for e in out["events"] if isinstance(e, Event)]
    checks = [e for e in events if e.type == "check"]
    assert [(e.pts_ns // 10**8, e.call_model) for e in checks] == [(10, True), (20, True), (30, True)]
    assert len({e.event_id for e in checks}) == 1
    new = next(e for e in events if e.type == "new")
    assert new.call_model and new.event_id != checks[0].event_id, "the checks left the budget to the arrival"

    book.observe(answer(True, book.question("cam", "Q?")))  # met: nothing more to re-check
    out = await run_node(TriggerPolicy("trigger", TriggerConfig(cooldown_s=0), watches=book), quiet)
    assert not [e for e in out["events"] if isinstance(e, Event)]

    book.set("cam", "cars", "a car is parked", confirm=1, recheck_s=1.0)
    busy = [Salience("cam", i, i * 100_000_000, 0, 0.9, {"visual": 0.9}) for i in range(35)]
    out = await run_node(TriggerPolicy("trigger", TriggerConfig(cooldown_s=0, update_interval_s=2), watches=book), busy)
    assert [e.type for e in out["events"] if isinstance(e, Event)] == ["new", "update", "end"], "the episode asks"


def test_an_unreadable_watch_file_is_set_aside_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "watches.json"
    for content in (
        "not json",
        json.dumps([{"id": "g", "source_id": "cam", "condition": "x", "expires_at_ns": "soon"}]),
    ):
        path.write_text(content)
        book = WatchBook(path)
        assert book.all() == [] and not path.exists()
        kept = sorted(tmp_path.glob("watches.json.unreadable-*"))
        assert kept and kept[-1].read_text() == content
        book.set("cam", "g", "x")  # saved afresh; what was set aside stays as it was
        assert json.loads(path.read_text())["watches"][0]["condition"] == "x" and kept[-1].read_text() == content
        for old in kept:
            old.unlink()


def test_a_watch_deleted_from_the_config_ends_at_the_next_start_and_a_commanded_one_stays(tmp_path: Path) -> None:
    state = tmp_path / "watches.json"

    def book(watches: list[dict[str, object]]) -> WatchBook:
        config = parse_config({
            "sources": [{"id": "cam", "url": "rtsp://192.0.2.1/x"}, {"id": "door", "url": "rtsp://192.0.2.1/y"}],
            "mllm": {"model": "smoke"}, "watches": watches, "watch_state": str(state),
        })  # fmt: skip
        pipeline = build_pipeline(config)
        assert pipeline.mllm is not None and pipeline.mllm.watches is not None
        return pipeline.mllm.watches

    first = book([{"id": "guests", "source": "cam", "condition": CONDITION}])
    first.set("door", "parcel", "a parcel lies at the door")  # by command
    again = book([])
    assert [(w.source_id, w.id) for w in again.all()] == [("door", "parcel")]
    assert [(t.source_id, t.state) for t in again.take()] == [("cam", "removed")]


def test_a_configured_watch_keeps_its_expiry_across_restarts_and_once_expired_stays_ended(tmp_path: Path) -> None:
    state, now = tmp_path / "watches.json", [1_000_000_000]

    def start(condition: str = CONDITION) -> WatchBook:  # what a daemon start does with [[watches]]
        book = WatchBook(state, clock=lambda: now[0])
        book.set("cam", "guests", condition, expires_s=60, origin="config")
        return book

    first = start()
    now[0] += 40 * 10**9
    assert start().of("cam").expires_at_ns == first.of("cam").expires_at_ns  # type: ignore[union-attr]
    now[0] += 30 * 10**9
    expiring = start()
    expiring.expire()
    assert [t.state for t in expiring.take()][-1] == "expired" and expiring.of("cam") is None
    assert start().of("cam") is None, "the same configuration at a later start does not bring it back"
    changed = start("three people are on the walkway")
    assert changed.of("cam") is not None and [t.state for t in changed.take()] == ["unmet"]
    now[0] += 30 * 10**9
    longer = WatchBook(state, clock=lambda: now[0])  # the entry's expiry raised in the config: a new expiry
    longer.set("cam", "guests", "three people are on the walkway", expires_s=600, origin="config")
    assert longer.of("cam").expires_at_ns == now[0] + 600 * 10**9  # type: ignore[union-attr]
    commanded = WatchBook(state, clock=lambda: now[0])
    commanded.set("cam", "guests", CONDITION, expires_s=60)  # by command: a watch like any other
    assert commanded.of("cam") is not None


def test_an_expired_configured_watch_deleted_and_added_again_is_a_new_watch(tmp_path: Path) -> None:
    state = tmp_path / "watches.json"

    def start(watches: list[dict[str, object]]) -> WatchBook:
        config = parse_config({
            "sources": [{"id": "cam", "url": "rtsp://192.0.2.1/x"}], "mllm": {"model": "smoke"},
            "watches": watches, "watch_state": str(state),
        })  # fmt: skip
        book = build_pipeline(config).mllm.watches  # type: ignore[union-attr]
        assert book is not None
        return book

    entry = {"id": "guests", "source": "cam", "condition": CONDITION, "expires_s": 0.001}
    first = start([entry])
    time.sleep(0.01)  # past its expiry (wall clock)
    first.expire()
    assert first.of("cam") is None
    assert start([entry]).of("cam") is None, "expired, and the entry unchanged: it stays ended"
    start([])  # deleted from the config...
    assert start([entry]).of("cam") is not None, "...and added again: a new watch"


def test_the_pipeline_hands_one_watch_book_to_the_trigger_the_stage_and_the_commands() -> None:
    """A watch set by command is the one the trigger re-checks and the stage asks about:
    one book, handed to each when it is built (nothing is set on a node afterwards)."""
    from stream_rt.sinks.commands import apply_command

    config = parse_config({"sources": [{"id": "cam", "url": "rtsp://192.0.2.1/x"}], "mllm": {"model": "smoke"}})
    pipeline = build_pipeline(config)
    assert pipeline.trigger is not None and pipeline.mllm is not None and pipeline.control is not None
    assert pipeline.trigger.watches is pipeline.mllm.watches is pipeline.control.watches is not None
    command = b'{"id": "guests", "condition": "two people are on the walkway", "recheck_s": 5}'
    apply_command(pipeline.control, {"cam"}, "cam", "watch", command)
    assert CONDITION in pipeline.mllm.question_for("cam")
    asked = apply_command(pipeline.control, {"cam"}, "cam", "ask", b'{"question": "Who is there?"}')["event_id"]
    assert pipeline.trigger.asks is not None and pipeline.trigger.asks.waiting("cam") == 1
    assert pipeline.trigger.asks.ledger is pipeline.mllm.asks, "the stage releases what the trigger's queue reserved"
    assert asked.startswith("cam-")

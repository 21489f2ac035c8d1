"""Every promise kept: each acknowledged question gets its event and one answer; every
event that asked for the model gets exactly one answer record, whatever fails in the
stage's call path; a model that hangs in its own thread never stalls perception."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import paho.mqtt.publish as mqtt_publish
import pytest

from stream_rt.config import LOSSLESS_CHANNELS, parse_config
from stream_rt.mllm.smoke import build_smoke_model
from stream_rt.pipeline import build_pipeline
from stream_rt.testing import Broker, Subscriber

from .test_mqtt import wait_until


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def one_answer_per_asking_event(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The answers, after checking that each event that called the model has exactly one
    (matched by event id and seq) and that no answer is for anything else."""
    asked = Counter((r["event_id"], r["seq"]) for r in rows if r["kind"] == "Event" and r["call_model"])
    answers = [r for r in rows if r["kind"] == "MllmAnswer"]
    answered = Counter((a["event_id"], a["seq"]) for a in answers)
    assert asked and answered == asked, (asked, answered)
    return answers


def smoke(**mllm: object) -> dict[str, object]:
    return {"model": str(build_smoke_model()), "reuse_threshold": 0, **mllm}


async def test_an_ask_flood_gets_one_event_and_one_answer_per_acknowledged_question(
    samples: Path, free_port: int, tmp_path: Path
) -> None:
    broker = Broker(free_port, tmp_path)
    broker.start()
    config = parse_config({
        "sources": [{"id": "walkway", "url": str(samples / "vtest.avi"), "audio": False}],
        "mllm": smoke(),
        "sinks": {"mqtt": {"port": free_port, "outbox": str(tmp_path / "outbox.sqlite")}},
    })  # fmt: skip
    pipeline = build_pipeline(config, speed=1.0)  # a live pace: the model is far slower than the questions
    subscriber = Subscriber(free_port, "stream_rt/#")
    run = asyncio.create_task(pipeline.graph.run())
    try:
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        await wait_until(lambda: pipeline.mqtt is not None and pipeline.mqtt.connected, 10, "the daemon")
        await wait_until(lambda: pipeline.sources[0].state == "online", 10, "the camera")
        await asyncio.sleep(0.3)  # the sink subscribes to commands after it connects

        def flood() -> None:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
            client.connect("127.0.0.1", free_port)
            client.loop_start()
            for i in range(300):
                client.publish("stream_rt/walkway/ask/set", json.dumps({"question": f"What is person {i} doing?"}), 1)
            client.loop_stop()
            client.disconnect()

        await asyncio.to_thread(flood)
        replies = lambda: [r for r in subscriber.payloads("/walkway/status") if r.get("command") == "ask"]  # noqa: E731
        await wait_until(lambda: len(replies()) == 300, 20, "a reply to every question")
        acknowledged = {r["event_id"] for r in replies() if r["ok"]}
        refused = [r for r in replies() if not r["ok"]]
        assert len(acknowledged) >= 8 and len(acknowledged) + len(refused) == 300
        assert all("still waiting for their answers: ask again later" in r["error"] for r in refused)

        def answered() -> set[str]:
            return {str(a["event_id"]) for a in subscriber.payloads("/walkway/answers")} & acknowledged

        await wait_until(lambda: answered() == acknowledged, 120, "an answer to every acknowledged question")
    finally:
        pipeline.graph.stop()
        await asyncio.wait_for(run, 30)
        await subscriber.close()
        broker.kill()
    asks = Counter(e["event_id"] for e in subscriber.payloads("/walkway/events") if e["type"] == "ask")
    answers = Counter(a["event_id"] for a in subscriber.payloads("/walkway/answers"))
    for event_id in acknowledged:
        assert asks[event_id] == 1 and answers[event_id] == 1, event_id
    assert {a["status"] for a in subscriber.payloads("/walkway/answers") if a["event_id"] in acknowledged} <= {
        "ok",
        "invalid",
    }, "questions wait for the model in order; none is replaced"


def fail_once(target: Any, nth: int) -> Any:
    """``target``, except that its ``nth`` call raises: a fault injected into one step (a
    function, so that it binds as a method where it replaces one)."""
    calls = 0

    def step(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == nth:
            raise RuntimeError(f"injected fault in {target.__name__}")
        return target(*args, **kwargs)

    return step


async def test_a_fault_in_any_step_of_the_call_path_answers_that_request_and_the_next_goes_ahead(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stream_rt.mllm.stage.intake as stage_module
    from stream_rt.memory.streaming import StreamingMemory
    from stream_rt.policies.answer_reuse import AnswerReuse

    config = parse_config({
        "sources": [{"id": "walkway", "url": str(samples / "vtest.avi"), "audio": False}],
        "graph": LOSSLESS_CHANNELS,
        "mllm": smoke(flow="block", memory={"enabled": True, "max_entries": 4, "anchors": 1, "tokens": 4}),
        "sinks": {"jsonl": {"path": str(tmp_path / "events.jsonl")}},
    })  # fmt: skip
    pipeline = build_pipeline(config, speed=None)
    stage = pipeline.mllm
    assert stage is not None
    # One fault per step, each in a different call: building the request, answer reuse,
    # the model, remembering the answer for reuse, adding it to the memory.
    monkeypatch.setattr(stage_module, "build_request", fail_once(stage_module.build_request, 1))
    monkeypatch.setattr(AnswerReuse, "lookup", fail_once(AnswerReuse.lookup, 2))
    monkeypatch.setattr(stage.backend, "answer", fail_once(stage.backend.answer, 2))  # the 3rd request's call
    monkeypatch.setattr(AnswerReuse, "remember", fail_once(AnswerReuse.remember, 3))
    monkeypatch.setattr(StreamingMemory, "add", fail_once(StreamingMemory.add, 4))
    await pipeline.graph.run()
    rows = records(tmp_path / "events.jsonl")
    answers = one_answer_per_asking_event(rows)
    assert len(answers) >= 7
    statuses = [a["status"] for a in answers]
    assert statuses[0] == "error" and "injected fault in build_request" in answers[0]["error"]
    assert statuses[2] == "error" and "injected fault" in answers[2]["error"], "the model call failed"
    assert set(statuses[3:]) <= {"ok", "invalid"}, "the calls after the faults go ahead"
    counters = pipeline.graph.statistics()["nodes"]
    assert counters["change"]["processed"] == counters["walkway"]["frames"] == 795, "perception saw every frame"
    assert counters["mllm"]["memory_errors"] == 2, "a lost memory entry or reuse record is counted; the answer stands"
    assert sum(1 for r in rows if r["kind"] == "EndOfStream") == 1 and rows[-1]["kind"] == "EndOfStream"


async def test_a_model_stuck_in_its_thread_never_stalls_perception(samples: Path, tmp_path: Path) -> None:
    config = parse_config({
        "sources": [{"id": "walkway", "url": str(samples / "vtest.avi"), "audio": False}],
        "trigger": {"update_interval_s": 0.5, "cooldown_s": 0.5, "max_calls_per_min": 600, "snapshot": True},
        "mllm": smoke(timeout_s=0.5),
        "sinks": {"jsonl": {"path": str(tmp_path / "events.jsonl")}},
    })  # fmt: skip
    pipeline = build_pipeline(config, speed=1.0)
    stage = pipeline.mllm
    assert stage is not None
    generate = stage.backend.generate  # type: ignore[attr-defined]

    def hang_then_generate(*args: Any, **kwargs: Any) -> Any:
        time.sleep(7)  # a vision encoder or prefill that hangs: cancellation cannot reach it
        return generate(*args, **kwargs)

    stage.backend.generate = hang_then_generate  # type: ignore[attr-defined]
    run = asyncio.create_task(pipeline.graph.run())
    nodes = lambda: pipeline.graph.statistics()["nodes"]  # noqa: E731
    await wait_until(lambda: nodes()["walkway"].get("frames", 0) > 0, 30, "the first frame")
    started, first = time.monotonic(), nodes()["walkway"]["frames"]
    stuck_seen = []
    while time.monotonic() - started < 9:
        await asyncio.sleep(0.25)
        stuck_seen.append(stage.health())
    wall, frames = time.monotonic() - started, nodes()["walkway"]["frames"] - first
    pipeline.graph.stop()
    await asyncio.wait_for(run, 20)
    counters = nodes()
    assert frames >= 0.9 * 10 * wall, f"{frames} frames in {wall:.1f} s of a 10 fps clip played in real time"
    assert counters["change"]["processed"] >= 0.95 * counters["walkway"]["frames"], "change detection kept up"
    assert any(h and "stuck in one call" in h for h in stuck_seen), "the stage says it is stuck"
    answers = one_answer_per_asking_event(records(tmp_path / "events.jsonl"))
    statuses = Counter(a["status"] for a in answers)
    assert statuses["timeout"] >= 1 and statuses["error"] >= 5, statuses
    assert any("still busy with a call given up on" in a["error"] for a in answers)
    assert counters["trigger"]["events_update"] >= 10, "events went on at their pace (snapshots included)"


async def test_events_of_a_source_without_video_are_answered_in_words(samples: Path, tmp_path: Path) -> None:
    config = parse_config({
        "sources": [{"id": "mic", "url": str(samples / "walkway_speech.mkv"), "video": False}],
        "graph": LOSSLESS_CHANNELS,
        "mllm": smoke(flow="block"),
        "sinks": {"jsonl": {"path": str(tmp_path / "events.jsonl")}},
    })  # fmt: skip
    pipeline = build_pipeline(config, speed=None)
    await pipeline.graph.run()
    answers = one_answer_per_asking_event(records(tmp_path / "events.jsonl"))
    assert len(answers) == 5, "one per speech episode"
    assert all(a["status"] in ("ok", "invalid") and a["tokens"]["visual"] == 0 for a in answers)


async def test_a_question_about_a_camera_that_sends_nothing_is_still_answered(free_port: int, tmp_path: Path) -> None:
    """An MQTT camera whose broker is up but whose publisher sends nothing: the questions
    go out after ask_wait_s with no picture, each answered; the camera is offline after
    stall_timeout_s, and then refuses new questions."""
    broker = Broker(free_port, tmp_path)
    broker.start()
    config = parse_config({
        "sources": [{"id": "robot", "url": f"mqtt://127.0.0.1:{free_port}/robot/camera", "stall_timeout_s": 3}],
        "trigger": {"ask_wait_s": 1.5},
        "mllm": smoke(),
        "sinks": {"mqtt": {"port": free_port, "outbox": str(tmp_path / "outbox.sqlite")}},
    })  # fmt: skip
    pipeline = build_pipeline(config)
    subscriber = Subscriber(free_port, "stream_rt/#")
    run = asyncio.create_task(pipeline.graph.run())
    camera = pipeline.sources[0]
    try:
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        await wait_until(lambda: pipeline.mqtt is not None and pipeline.mqtt.connected, 10, "the daemon")
        await wait_until(lambda: camera.state == "online", 10, "the subscription")
        await asyncio.sleep(0.3)  # the sink subscribes to commands after it connects
        send = lambda q: mqtt_publish.single("stream_rt/robot/ask/set", json.dumps({"question": q}), qos=1,  # noqa: E731
                                             hostname="127.0.0.1", port=free_port)  # fmt: skip
        for i in range(3):
            await asyncio.to_thread(send, f"Is anyone there ({i})?")
        replies = lambda: [r for r in subscriber.payloads("/robot/status") if r.get("command") == "ask"]  # noqa: E731
        await wait_until(lambda: len(replies()) == 3, 10, "the replies")
        asked = {r["event_id"] for r in replies() if r["ok"]}
        assert len(asked) == 3
        answered = lambda: {a["event_id"] for a in subscriber.payloads("/robot/answers")}  # noqa: E731
        await wait_until(lambda: answered() >= asked, 30, "an answer to every question")
        await wait_until(lambda: camera.state == "offline", 10, "the stall watchdog")
        await asyncio.to_thread(send, "And now?")
        await wait_until(lambda: len(replies()) == 4, 10, "the reply")
        assert replies()[-1]["ok"] is False and "offline" in replies()[-1]["error"]
    finally:
        pipeline.graph.stop()
        await asyncio.wait_for(run, 20)
        await subscriber.close()
        broker.kill()
    asks = [e for e in subscriber.payloads("/robot/events") if e["type"] == "ask"]
    assert sorted(e["event_id"] for e in asks) == sorted(asked), "one ask event each"
    states = [
        json.loads(p)["state"] for t, p, _ in subscriber.messages if t == "stream_rt/robot/status" and b"state" in p
    ]
    assert states[:2] == ["online", "offline"], "no frame for stall_timeout_s: offline"


def test_stopping_a_replay_that_asks_the_model_answers_every_event(samples: Path, tmp_path: Path) -> None:
    """SIGINT in the middle of a replay whose model is slower than its events (as fast as
    possible, flow 'block'): those still waiting are answered 'dropped', none is left
    without an answer."""
    import signal
    import subprocess
    import sys

    config = tmp_path / "busy.toml"
    config.write_text(
        "[trigger]\nupdate_interval_s = 0.5\ncooldown_s = 0.5\nmax_calls_per_min = 600\n"
        f'[mllm]\nmodel = "{build_smoke_model()}"\nreuse_threshold = 0\n[graph]\ndrain_timeout_s = 2\n'
    )
    out = tmp_path / "events.jsonl"
    replay = subprocess.Popen(
        [sys.executable, "-m", "stream_rt.cli", "replay", str(samples / "walkway_speech.mkv"), "--config", str(config),
         "--out", str(out), "--speed", "max", "--no-progress"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (out.exists() and sum(1 for r in records(out) if r["kind"] == "MllmAnswer") >= 3):
        assert time.monotonic() < deadline and replay.poll() is None, "the replay did not get going"
        time.sleep(0.2)
    replay.send_signal(signal.SIGINT)
    _, stderr = replay.communicate(timeout=60)
    assert replay.returncode == 0, stderr.decode()[-2000:]
    rows = records(out)
    answers = one_answer_per_asking_event(rows)
    assert {a["status"] for a in answers} >= {"dropped"}, "some were still waiting when it stopped"
    assert rows[-1]["kind"] == "EndOfStream" and rows[-1]["reason"] == "stopped"


async def test_the_model_runs_on_one_daemon_thread_kept_while_a_call_is_stuck() -> None:
    """A stage restarted while its model is stuck in a call must not start the model on a
    second thread: later work waits behind the stuck call, on the same (daemon) thread."""
    import threading

    from stream_rt.mllm.backend import Backend

    backend = Backend()
    release = threading.Event()
    stuck = asyncio.ensure_future(backend.in_model_thread(release.wait, 10))
    await wait_until(lambda: backend.busy_since is not None, 5, "the call to start")
    thread = backend._thread
    assert thread is not None and thread._thread.daemon, "a hung call never keeps the daemon from exiting"
    await backend.close()  # as a restart does
    assert backend._thread is thread
    after = asyncio.ensure_future(backend.in_model_thread(threading.get_ident))
    await asyncio.sleep(0.2)
    assert not after.done(), "it waits behind the stuck call"
    release.set()
    assert await stuck is True and await after == thread._thread.ident
    await backend.close()
    assert backend._thread is None and backend.busy_since is None


def test_a_program_that_ends_while_its_model_is_inside_torch_exits_cleanly() -> None:
    """The model thread is a daemon; one still inside a torch op when the interpreter
    finalizes aborts the process ("terminate called without an active exception"), so the
    exit waits for the call under way."""
    import subprocess
    import sys

    program = """
import asyncio, torch
from stream_rt.mllm.model_thread import ModelThread

def call():
    a = torch.randn(1200, 1200)
    for _ in range(48):  # well over the 0.3 s main() waits, however fast the machine
        a = (a @ a).clamp(-1, 1)
    print("call ended", flush=True)

async def main():
    asyncio.ensure_future(ModelThread("model").run(call))
    await asyncio.sleep(0.3)

asyncio.run(main())
print("main ended", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["main", "ended", "call", "ended"]

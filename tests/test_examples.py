"""Every example in examples/, run end to end on real sample media with the smoke model:
the camera daemon (a real RTSP camera, real mosquitto), the robot agent, the MQTT
pipeline and the offline batch replay."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from pathlib import Path

from stream_rt.testing import Broker, RtspCamera, Subscriber
from stream_rt.testing import free_port as free_port_now

from .test_mqtt import wait_until

EXAMPLES = Path(__file__).parents[1] / "examples"


def example_config(name: str, tmp_path: Path, replacements: dict[str, str]) -> Path:
    """``examples/<name>`` with its addresses and paths replaced by the test's own."""
    text = (EXAMPLES / name).read_text()
    for old, new in replacements.items():
        text = text.replace(old, new)
    config = tmp_path / name
    config.write_text(text)
    return config


async def run_daemon(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream_rt.cli", "run", str(config), stderr=asyncio.subprocess.PIPE
    )


async def stop(daemon: asyncio.subprocess.Process) -> str:
    if daemon.returncode is None:
        daemon.terminate()
    _, stderr = await asyncio.wait_for(daemon.communicate(), 60)
    return stderr.decode()


async def test_the_camera_daemon_watches_an_rtsp_camera_through_an_outage(
    samples: Path, free_port: int, tmp_path: Path
) -> None:
    """The camera example against a real RTSP server on loopback: events and answers; the
    server killed, the camera offline on MQTT; started again, the daemon is back online
    by itself and answers again."""
    camera = RtspCamera(free_port_now())
    camera.start()
    broker = Broker(free_port, tmp_path)
    broker.start()
    http = free_port_now()
    config = example_config("camera.toml", tmp_path, {
        "rtsp://192.0.2.10:554/stream1": camera.url(),
        'path = "gate.jsonl"': f'path = "{tmp_path / "gate.jsonl"}"',
        'host = "127.0.0.1"\n': f'host = "127.0.0.1"\nport = {free_port}\n',
        "/var/lib/stream-rt/outbox.sqlite": str(tmp_path / "outbox.sqlite"),
        "127.0.0.1:9108": f"127.0.0.1:{http}",
        "max_s = 30": "max_s = 2",
    })  # fmt: skip
    subscriber = Subscriber(free_port)

    def states() -> list[object]:
        return [s.get("state") for s in subscriber.payloads("/gate/status") if "state" in s]

    daemon = await run_daemon(config)
    try:
        await wait_until(lambda: len(subscriber.payloads("/gate/answers")) >= 1, 90, "an answer")
        health = urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=5)
        assert health.status == 200
        camera.kill()
        await wait_until(lambda: states()[-1:] == ["offline"], 30, "the camera to be reported offline")
        answered = len(subscriber.payloads("/gate/answers"))
        camera.start()
        await wait_until(lambda: states()[-1:] == ["online"], 30, "the daemon to reconnect by itself")
        await wait_until(lambda: len(subscriber.payloads("/gate/answers")) > answered, 90, "an answer after it")
    finally:
        stderr = await stop(daemon)
        await subscriber.close()
        broker.kill()
        camera.kill()
    assert daemon.returncode == 0, stderr[-2000:]
    events = subscriber.payloads("/gate/events")
    assert events and events[0]["type"] == "new"
    answer = subscriber.payloads("/gate/answers")[0]
    assert answer["event_id"] in {e["event_id"] for e in events} and "not meaningful" in answer["smoke"]
    assert "Traceback" not in stderr, stderr[-2000:]


async def test_the_robot_agent_gets_actions_back_through_its_callback() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "robot_agent.py"), "--seconds", "32", "--speed", "4",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 180)
    finally:
        if proc.returncode is None:  # timed out or interrupted: the example leaves with the test
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    actions = [line for line in stdout.decode().splitlines() if line.startswith("t=")]
    answered = [a for a in actions if " ok " in a]
    assert len(answered) >= 2, stdout.decode()
    assert all("action='none'" in a and "stop=contract" in a for a in answered), answered
    # flow="latest": a request the model was too busy for is replaced by the newer view and
    # comes back "dropped" (a loaded machine); nothing else may come back.
    assert all(" dropped " in a for a in actions if a not in answered), actions


async def test_the_mqtt_pipeline_takes_frames_over_mqtt_and_answers_over_mqtt(
    samples: Path, free_port: int, tmp_path: Path
) -> None:
    broker = Broker(free_port, tmp_path)
    broker.start()
    config = example_config("mqtt_pipeline.toml", tmp_path, {
        "127.0.0.1:1883": f"127.0.0.1:{free_port}",
        "port = 1883": f"port = {free_port}",
        'outbox = "stream_rt-outbox.sqlite"': f'outbox = "{tmp_path / "outbox.sqlite"}"',
    })  # fmt: skip
    subscriber = Subscriber(free_port)
    daemon = await run_daemon(config)
    try:
        await asyncio.sleep(3)  # the daemon subscribes to the frames topic
        publisher = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLES / "publish_frames.py"), str(samples / "still_motion.mkv"),
            "--topic", "site/cam1/frames", "--port", str(free_port), "--speed", "4",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(publisher.communicate(), 120)
        assert publisher.returncode == 0 and b"published" in out
        new_events = lambda: [e for e in subscriber.payloads("/cam1/events") if e["type"] == "new"]  # noqa: E731
        # At 4x the trigger's 3 s cutoff spans 12 s of the clip: its last two moments of
        # motion (51 s and 74 s) make one episode.
        await wait_until(lambda: len(new_events()) >= 2, 60, "an event for each episode")
        await wait_until(lambda: len(subscriber.payloads("/cam1/answers")) >= 2, 60, "the answers")
    finally:
        stderr = await stop(daemon)
        await subscriber.close()
        broker.kill()
    assert daemon.returncode == 0, stderr[-2000:]
    new = [e for e in subscriber.payloads("/cam1/events") if e["type"] == "new"]
    assert len(new) >= 2
    assert {a["event_id"] for a in subscriber.payloads("/cam1/answers")} <= {e["event_id"] for e in new}


async def test_the_batch_replay_reports_every_recording_of_a_folder(samples: Path, tmp_path: Path) -> None:
    folder = tmp_path / "recordings"
    folder.mkdir()
    (folder / "still_motion.mkv").symlink_to(samples / "still_motion.mkv")
    (folder / "walkway.mkv").symlink_to(samples / "walkway_speech.mkv")
    (folder / "broken.mp4").write_bytes(b"\x00not media" * 500)
    out = tmp_path / "reports"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "batch_replay.py"), str(folder), "--out", str(out), "--model", "smoke",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    rows = {r["file"]: r for r in json.loads((out / "batch.json").read_text())}
    assert rows["still_motion.mkv"]["episodes"] == 3 and rows["walkway.mkv"]["episodes"] >= 1
    assert "cannot open" in rows["broken.mp4"]["error"], "a bad file is listed, and the batch goes on"
    index = (out / "index.html").read_text()
    for name in ("still_motion", "walkway"):
        assert f'href="{name}/index.html"' in index and (out / name / "index.html").is_file()


async def test_the_recent_frames_baseline_sends_the_last_four_frames_whole(samples: Path, tmp_path: Path) -> None:
    async def replay(name: str, replacements: dict[str, str]) -> list[dict]:
        out = tmp_path / f"{name}.jsonl"
        config = example_config("recent_frames.toml", tmp_path, {
            '"samples/walkway_speech.mkv"': f'"{samples / "walkway_speech.mkv"}"',
            '"recent_frames.jsonl"': f'"{out}"', **replacements,
        })  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stream_rt.cli", "run", str(config), "--speed", "max", stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), 300)
        assert proc.returncode == 0, stderr.decode()[-2000:]
        records = [json.loads(line) for line in out.read_text().splitlines()]
        return [r for r in records if r["kind"] == "MllmAnswer" and r["status"] == "ok"]

    recent = await replay("recent", {})
    keyframe = await replay("keyframe", {"frames = 4 ": "frames = 1 "})
    assert recent and keyframe
    per_frame = keyframe[0]["tokens"]["visual"]
    sent = [r["tokens"]["visual"] for r in recent]
    # Every token of the last four frames (an event in the first 3 s has fewer frames before it).
    assert max(sent) == 4 * per_frame and all(v % per_frame == 0 for v in sent), sent
    assert sum(v == 4 * per_frame for v in sent) >= len(sent) - 1, sent


PUBLIC_MODULES = {"stream_rt", "stream_rt.testing", "stream_rt.media.images"}


def test_the_examples_import_only_the_public_api() -> None:
    """What an example imports is what a user may: ``stream_rt`` and its documented public
    submodules, never the implementation's modules."""
    import ast

    private = []
    for path in sorted(EXAMPLES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            private += [f"{path.name}: {n}" for n in names if n.startswith("stream_rt") and n not in PUBLIC_MODULES]
    assert not private, private

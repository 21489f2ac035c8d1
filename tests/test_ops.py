"""/healthz and /metrics, read over real HTTP from a running graph."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

from stream_rt import AvSource, CallbackSink, Graph, ReplayClock
from stream_rt.config import BackoffConfig, InputConfig
from stream_rt.ops.http import OpsServer
from stream_rt.sinks.mqtt import MqttSink
from stream_rt.sources.status import FrameRate
from stream_rt.testing import StreamServer

from .test_commands import Waiting
from .test_live import wait_for


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_healthz_fails_once_a_source_is_offline_past_the_grace(samples: Path, free_port: int) -> None:
    graph = Graph(clock=ReplayClock(1.0), drain_timeout_s=1)
    online = AvSource("walkway", str(samples / "vtest.avi"), audio=False)
    never = AvSource(
        "gate",
        f"tcp://127.0.0.1:{free_port}",
        config=InputConfig(timeout_s=1, reconnect=BackoffConfig(initial_s=0.1, max_s=0.2, jitter=0.1)),
    )
    for source in (online, never):
        graph.add(source)
        graph.add(CallbackSink(f"sink_{source.name}", lambda p: None))
        graph.connect(f"{source.name}.video", f"sink_{source.name}.in", policy="latest")
    server = OpsServer(graph.statistics, [online, never], graph.clock, port=0, offline_grace_s=0.5)
    await server.start()
    run = asyncio.create_task(graph.run())
    try:
        status, body = await asyncio.to_thread(get, server.port, "/healthz")
        assert (status, body.strip()) == (200, "ok"), "within the grace"
        await asyncio.sleep(0.7)  # no poll in between: the clock runs from the start, not from the first look
        status, body = await asyncio.to_thread(get, server.port, "/healthz")
        assert status == 503 and body.strip() == "unhealthy: gate (offline for 1 s)", body
        status, metrics = await asyncio.to_thread(get, server.port, "/metrics")
        assert status == 200
        assert 'stream_rt_source_online{source="walkway"} 1' in metrics
        assert 'stream_rt_source_online{source="gate"} 0' in metrics
        assert 'stream_rt_node_total{counter="frames",node="walkway"}' in metrics
        assert 'stream_rt_channel_depth{edge="walkway.video->sink_walkway.in"}' in metrics
        await asyncio.sleep(1.0)  # two whole seconds of a 10 fps clip played in real time
        metrics = (await asyncio.to_thread(get, server.port, "/metrics"))[1]
        fps = {line.split('node="')[1].split('"')[0]: float(line.split()[-1])
               for line in metrics.splitlines() if 'level="fps"' in line}  # fmt: skip
        assert fps["gate"] == 0 and 8 <= fps["walkway"] <= 12, fps
        assert (await asyncio.to_thread(get, server.port, "/"))[0] == 404
    finally:
        graph.stop()
        await asyncio.wait_for(run, 5)
        await server.stop()


async def test_the_offline_clock_starts_at_the_outage(server: StreamServer, free_port: int) -> None:
    graph = Graph(drain_timeout_s=1)
    fast = BackoffConfig(initial_s=0.2, max_s=0.5, jitter=0.1)
    camera = AvSource("cam", f"tcp://127.0.0.1:{free_port}", audio=False,
                      config=InputConfig(stall_timeout_s=5, timeout_s=5, reconnect=fast))  # fmt: skip
    graph.add(camera)
    graph.add(CallbackSink("sink", lambda p: None))
    graph.connect("cam.video", "sink.in", policy="latest")
    ops = OpsServer(graph.statistics, [camera], graph.clock, port=0, offline_grace_s=1.0)
    await ops.start()
    run = asyncio.create_task(graph.run())
    try:
        await wait_for(lambda: camera.state == "online", 20, "the camera")
        await asyncio.sleep(1.5)  # online for longer than the grace
        server.kill()
        await wait_for(lambda: camera.state == "offline", 10, "the outage")
        status, body = await asyncio.to_thread(get, ops.port, "/healthz")
        assert status == 200, "the outage is younger than the grace"
        await asyncio.sleep(1.2)
        status, body = await asyncio.to_thread(get, ops.port, "/healthz")
        assert status == 503 and body.startswith("unhealthy: cam (offline for 1 s)"), body
    finally:
        graph.stop()
        await asyncio.wait_for(run, 5)
        await ops.stop()


async def test_healthz_names_a_broker_unreachable_past_the_grace(free_port: int, tmp_path: Path) -> None:
    from stream_rt.testing import Broker

    from .test_mqtt import settings

    sink = MqttSink("mqtt", settings(free_port, tmp_path))
    graph = Graph(drain_timeout_s=1)
    graph.add(Waiting("feed", []))
    graph.add(sink)
    graph.connect("feed.out", "mqtt.in")
    ops = OpsServer(graph.statistics, [], graph.clock, port=0, offline_grace_s=0.5, checks=[sink])
    await ops.start()
    run = asyncio.create_task(graph.run())
    broker = Broker(free_port, tmp_path)
    try:
        status, body = await asyncio.to_thread(get, ops.port, "/healthz")
        assert status == 200, "unreachable for less than the grace"
        await asyncio.sleep(0.7)
        expected = f"unhealthy: mqtt (MQTT broker 127.0.0.1:{free_port} unreachable for "
        # The grace counts from the first failed attempt, which a loaded machine may make late.
        for _ in range(50):
            status, body = await asyncio.to_thread(get, ops.port, "/healthz")
            if status == 503:
                break
            await asyncio.sleep(0.1)
        assert status == 503 and body.startswith(expected), body
        broker.start()
        await wait_for(lambda: sink.connected, 10, "the sink to connect")
        assert (await asyncio.to_thread(get, ops.port, "/healthz"))[0] == 200
    finally:
        graph.stop()
        await asyncio.wait_for(run, 5)
        await ops.stop()
        broker.kill()


def test_the_endpoints_bind_to_loopback_by_default() -> None:
    server = OpsServer(dict, [], ReplayClock(None))
    assert server.host == "127.0.0.1"


def test_frame_rate_counts_whole_seconds_in_its_window() -> None:
    rate = FrameRate(window_s=2)
    second = 1_000_000_000
    assert rate.rate(0) == 0
    for i in range(30):  # 30 fps during the first second, then 10 fps
        rate.tick(i * second // 30)
    assert rate.rate(second) == 30  # only the first second is over
    for i in range(30):
        rate.tick(second + i * second // 10)
    assert rate.rate(4 * second) == 10  # seconds 2 and 3: 10 frames each
    assert rate.rate(7 * second) == 0  # nothing in the last two seconds


async def test_metrics_pass_promtool_with_latency_histograms(samples: Path) -> None:
    """A replay with the model on: `promtool check metrics` (Prometheus' own linter) has
    nothing to say, and the model's latencies are histograms."""
    import shutil
    import subprocess

    from stream_rt.config import for_replay, parse_config
    from stream_rt.pipeline import build_pipeline

    config = for_replay(parse_config({
        "sources": [{"id": "walkway", "url": str(samples / "still_motion.mkv"), "audio": False}],
        "trigger": {"update_interval_s": 2}, "mllm": {"model": "smoke"},
    }))  # fmt: skip
    pipeline = build_pipeline(config, speed=None)
    await pipeline.graph.run()
    assert json.loads(json.dumps(pipeline.graph.statistics()))["histograms"]["mllm"], "the stats topic's JSON"
    text = OpsServer(pipeline.graph.statistics, pipeline.sources, pipeline.graph.clock, port=0).metrics()
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package (scripts/setup.sh installs it)"
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked.stdout + checked.stderr
    calls = float(  # prometheus_client writes every value as a float (3.0)
        next(line.split()[-1] for line in text.splitlines() if line.startswith("stream_rt_model_call_seconds_count"))
    )
    assert calls >= 1 and 'stream_rt_event_answer_seconds_bucket{le="+Inf",node="mllm"}' in text
    assert 'counter="answers_ok",node="mllm",source="walkway"' in text, "counters labelled by source"


async def test_the_outbox_depth_is_a_level_not_a_counter(free_port: int, tmp_path: Path) -> None:
    """The MQTT sink's outbox depth goes down as the broker acknowledges: a gauge (it was
    exported as a counter, which Prometheus' rate() reads as resets)."""
    import shutil
    import subprocess

    from stream_rt.testing import feed_graph

    from .test_mqtt import settings

    graph = feed_graph(MqttSink("mqtt", settings(free_port, tmp_path), drain_timeout_s=0.1), range(25))
    await graph.run()  # no broker: all 25 wait in the outbox
    text = OpsServer(graph.statistics, [], graph.clock, port=0).metrics()
    depth = [line for line in text.splitlines() if "outbox_depth" in line]
    assert depth == ['stream_rt_node_level{level="outbox_depth",node="mqtt"} 25.0'], depth
    promtool = shutil.which("promtool")
    assert promtool
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked.stdout + checked.stderr

"""/healthz and /metrics, read over real HTTP from a running graph."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from pathlib import Path

from stream_rt import AvSource, Backoff, CallbackSink, Graph, ReplayClock
from stream_rt.ops.http import OpsServer


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_healthz_fails_once_a_source_is_offline_past_the_grace(samples: Path, free_port: int) -> None:
    graph = Graph(clock=ReplayClock(1.0), drain_timeout_s=1)
    online = AvSource("walkway", str(samples / "vtest.avi"), audio=False)
    offline = AvSource("gate", f"tcp://127.0.0.1:{free_port}", backoff=Backoff(0.1, 0.2, 0.1), timeout_s=1)
    for source in (online, offline):
        graph.add(source)
        graph.add(CallbackSink(f"sink_{source.name}", lambda p: None))
        graph.connect(f"{source.name}.video", f"sink_{source.name}.in", policy="latest")
    server = OpsServer(graph.statistics, [online], graph.clock, port=0, offline_grace_s=0.5)
    await server.start()
    run = asyncio.create_task(graph.run())
    try:
        await asyncio.sleep(0.5)
        status, body = await asyncio.to_thread(get, server.port, "/healthz")
        assert (status, body.strip()) == (200, "ok")
        server.sources = [online, offline]
        await asyncio.to_thread(get, server.port, "/healthz")  # the offline clock starts
        await asyncio.sleep(0.7)
        status, body = await asyncio.to_thread(get, server.port, "/healthz")
        assert status == 503 and body.startswith("offline: gate (offline for")
        status, metrics = await asyncio.to_thread(get, server.port, "/metrics")
        assert status == 200
        assert 'stream_rt_source_online{source="walkway"} 1' in metrics
        assert 'stream_rt_source_online{source="gate"} 0' in metrics
        assert 'stream_rt_node_total{node="walkway",counter="frames"}' in metrics
        assert 'stream_rt_channel_depth{edge="walkway.video->sink_walkway.in"}' in metrics
        assert (await asyncio.to_thread(get, server.port, "/"))[0] == 404
    finally:
        graph.stop()
        await asyncio.wait_for(run, 5)
        await server.stop()


def test_the_endpoints_bind_to_loopback_by_default() -> None:
    server = OpsServer(dict, [], ReplayClock(None))
    assert server.host == "127.0.0.1"

"""Live audio that lags its video: real ffmpeg servers on loopback read by live AvSources."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from stream_rt import AudioChunk, AvSource, CallbackSink, Graph, Packet, VideoFrame
from stream_rt.config import BackoffConfig, InputConfig
from stream_rt.testing import LaggingAvServer, free_port

from .processes import RecordProperty


async def served(servers: Iterable[LaggingAvServer]) -> None:
    """Wait until each server has sent its cut (once) and exited, and a moment more."""
    deadline = asyncio.get_running_loop().time() + 20
    while not all(s.proc is not None and s.proc.poll() is not None for s in servers):
        assert asyncio.get_running_loop().time() < deadline, "the servers did not finish their cut"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)


def arrival_lag_s(got: list[Packet], skip_s: float, tail_s: float) -> tuple[float, int]:
    """Median over audio chunks of (wall time of the chunk - wall time of the video at the
    chunk's media time, interpolated between frames), in s, and how many chunks counted:
    those from ``skip_s`` after the first video frame to ``tail_s`` before the last."""
    video = np.array([(p.pts_ns, p.wall_ns) for p in got if isinstance(p, VideoFrame)], np.float64)
    audio = [(p.pts_ns, p.wall_ns) for p in got if isinstance(p, AudioChunk)]
    first, last = video[0, 0] + skip_s * 1e9, video[-1, 0] - tail_s * 1e9
    lags = [(wall - np.interp(pts, video[:, 0], video[:, 1])) / 1e9 for pts, wall in audio if first <= pts <= last]
    return statistics.median(lags), len(lags)


async def test_audio_of_a_lagging_server_arrives_half_a_second_after_its_video(
    ffmpeg: str, samples: Path, tmp_path: Path, record_property: RecordProperty
) -> None:
    ports: list[int] = []
    while len(ports) < 2:
        port = free_port()
        if port not in ports:
            ports.append(port)
    servers = {
        name: LaggingAvServer(ffmpeg, samples / "walkway_speech.mkv", tmp_path, port, late_s)
        for (name, late_s), port in zip((("lagging", 0.5), ("together", 0.0)), ports, strict=True)
    }
    graph = Graph(drain_timeout_s=2)
    got: dict[str, list[Packet]] = {name: [] for name in servers}
    sources = {
        name: AvSource(
            name,
            f"tcp://127.0.0.1:{s.port}",
            config=InputConfig(reconnect=BackoffConfig(initial_s=5.0, max_s=5.0, jitter=0.0)),
        )
        for name, s in servers.items()
    }
    for name, server in servers.items():
        server.start()
        graph.add(sources[name])
        graph.add(CallbackSink(f"{name}_sink", got[name].append))
        graph.connect(f"{name}.video", f"{name}_sink.in", capacity=256)
        graph.connect(f"{name}.audio", f"{name}_sink.in", capacity=256)
    run = asyncio.create_task(graph.run())
    try:
        await served(servers.values())
    finally:
        graph.stop()
        await asyncio.wait_for(run, 10)
        for server in servers.values():
            server.kill()
    assert all(source.streams == ("video", "audio") for source in sources.values())
    lagging, n_lagging = arrival_lag_s(got["lagging"], skip_s=1.0, tail_s=0.6)
    together, n_together = arrival_lag_s(got["together"], skip_s=1.0, tail_s=0.6)
    record_property("audio_lag_s", round(lagging, 3))
    record_property("audio_lag_together_s", round(together, 3))
    assert n_lagging > 30 and n_together > 30, "audio over about 3 s of the stream is measured"
    assert 0.3 <= lagging <= 0.8, f"audio {lagging:.3f} s behind its video, expected about 0.5 s"
    assert abs(together) <= 0.15, f"audio {together:.3f} s behind its video, expected about 0"


async def test_a_live_source_whose_audio_lags_its_video_is_fused_by_media_time(
    ffmpeg: str, samples: Path, tmp_path: Path, record_property: RecordProperty
) -> None:
    """Two live cameras serve the same cut (speech from 1.74 s of it), one with its audio
    0.5 s behind its video: the speech lands on the same video steps in both."""
    from stream_rt import Salience
    from stream_rt.config import parse_config
    from stream_rt.pipeline import build_pipeline

    servers = {}
    for name, late_s in (("lagging", 0.5), ("together", 0.0)):
        port = free_port()
        while port in {s.port for s in servers.values()}:
            port = free_port()
        servers[name] = LaggingAvServer(ffmpeg, samples / "walkway_speech.mkv", tmp_path, port, late_s, start_s=6.5)
    config = parse_config({"sources": [
        {"id": name, "url": f"tcp://127.0.0.1:{s.port}", "reconnect": {"initial_s": 5, "max_s": 5, "jitter": 0}}
        for name, s in servers.items()
    ]})  # fmt: skip
    pipeline = build_pipeline(config)
    steps: list[Packet] = []
    pipeline.graph.add(CallbackSink("steps", steps.append))
    pipeline.graph.connect("salience.salience", "steps.in", capacity=4096)
    for server in servers.values():
        server.start()
    run = asyncio.create_task(pipeline.graph.run())
    try:
        await served(servers.values())
    finally:
        pipeline.graph.stop()
        await asyncio.wait_for(run, 10)
        for server in servers.values():
            server.kill()

    # Both servers send the same timestamps (MPEG-TS starts the cut at its own offset).
    fused = [s for s in steps if isinstance(s, Salience)]
    start_ns = min(s.pts_ns for s in fused)

    def speech_onset_s(name: str) -> float:
        return next(s.pts_ns - start_ns for s in fused if s.source_id == name and s.components["speech"] > 0.5) / 1e9

    lagging, together = speech_onset_s("lagging"), speech_onset_s("together")
    record_property("speech_onset_lagging_s", round(lagging, 3))
    record_property("speech_onset_together_s", round(together, 3))
    assert 1.4 <= together <= 2.1, f"speech from 1.74 s of the cut, first fused at {together:.2f} s"
    assert abs(lagging - together) <= 0.15, f"lagging audio fused {lagging - together:+.2f} s away from its video"
    assert pipeline.graph.statistics()["nodes"]["salience"].get("late_steps", 0) == 0

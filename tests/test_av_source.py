"""The PyAV source on real recordings and generated media."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import av
import numpy as np
import pytest

from stream_rt import (
    AUDIO_SAMPLE_RATE,
    AudioChunk,
    AvSource,
    Backoff,
    CallbackSink,
    Graph,
    NodeFailed,
    Packet,
    ReplayClock,
    VideoFrame,
)
from stream_rt.config import BackoffConfig, InputConfig
from stream_rt.sources.av_decode import PtsSanitiser
from stream_rt.testing.media import audio_lag_s, remux_audio_late

from .media import make_media


async def replay(path: Path, **kwargs: object) -> tuple[list[VideoFrame], list[AudioChunk], dict[str, int]]:
    graph = Graph()
    source = AvSource("src", str(path), **kwargs)  # type: ignore[arg-type]
    video: list[VideoFrame] = []
    audio: list[AudioChunk] = []
    graph.add(source)
    graph.add(CallbackSink("v", video.append))  # type: ignore[arg-type]
    graph.add(CallbackSink("a", audio.append))  # type: ignore[arg-type]
    graph.connect("src.video", "v.in")
    graph.connect("src.audio", "a.in", capacity=64)
    await asyncio.wait_for(graph.run(), 60)
    return video, audio, graph.statistics()["nodes"]["src"]


async def emitted(path: Path, **kwargs: object) -> tuple[list[tuple[str, int]], AvSource]:
    """(kind, pts_ns) of every packet a replay of ``path`` emits, in the order the source
    emitted them (their ``seq``), and the source."""
    graph = Graph()
    source = AvSource("src", str(path), **kwargs)  # type: ignore[arg-type]
    got: list[Packet] = []
    graph.add(source)
    graph.add(CallbackSink("sink", got.append))
    graph.connect("src.video", "sink.in", capacity=64)
    graph.connect("src.audio", "sink.in", capacity=64)
    await asyncio.wait_for(graph.run(), 60)
    order = sorted(got, key=lambda p: p.seq)
    return [("video" if isinstance(p, VideoFrame) else "audio", p.pts_ns) for p in order], source


def open_descriptors(path: Path) -> list[str]:
    """This process's file descriptors open on ``path``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path.resolve()):
                found.append(fd)
        except OSError:
            pass  # closed meanwhile
    return found


async def test_how_a_file_interleaves_its_streams_does_not_change_what_comes_out(samples: Path, tmp_path: Path) -> None:
    interleaved = samples / "walkway_speech.mkv"
    if not (samples / "walkway_speech_late.mkv").exists():
        pytest.fail("walkway_speech_late.mkv missing: run 'python scripts/fetch_samples.py'", pytrace=False)
    files = {
        "interleaved": interleaved,
        "all audio after all video": samples / "walkway_speech_late.mkv",
        "audio 1 s late": remux_audio_late(interleaved, tmp_path / "late_1s.mkv", 1.0),
        "audio 3 s late": remux_audio_late(interleaved, tmp_path / "late_3s.mkv", 3.0),
    }
    # File order really is late: how far the video stored before each audio packet is ahead of it.
    lags = {name: audio_lag_s(path) for name, path in files.items()}
    assert max(lags["interleaved"]) <= 0.1, "interleaved within a video frame"
    for late_s in (1.0, 3.0):
        lag = lags[f"audio {late_s:g} s late"]
        assert late_s - 0.1 < statistics.median(lag) and max(lag) <= late_s + 1e-6
    assert statistics.median(lags["all audio after all video"]) > 30 and max(lags["all audio after all video"]) > 79

    reference, source = await emitted(interleaved)
    assert [kind for kind, _ in reference].count("video") == 795 and len(reference) == 795 + 1243
    pts = [pts for _, pts in reference]
    assert pts == sorted(pts), "packets leave in media-time order"
    assert source.streams == ("video", "audio")
    for name, path in list(files.items())[1:]:
        ours, _ = await emitted(path)
        assert ours == reference, f"{name}: not the interleaved file's sequence"


@pytest.mark.parametrize(
    "kwargs,audio_rate,streams",
    [({}, 44_100, ("video", "audio")), ({}, None, ("video",)), ({"video": False}, 44_100, ("audio",))],
)
async def test_the_source_names_the_streams_it_decodes(
    tmp_path: Path, kwargs: dict[str, bool], audio_rate: int | None, streams: tuple[str, ...]
) -> None:
    path = make_media(tmp_path / "clip.mkv", frames=10, audio_rate=audio_rate)
    out, source = await emitted(path, **kwargs)
    assert source.streams == streams
    assert {kind for kind, _ in out} == set(streams)


async def test_a_file_stopped_early_leaves_no_demuxer_open(samples: Path) -> None:
    path = samples / "walkway_speech.mkv"
    graph = Graph(clock=ReplayClock(speed=1.0))
    got: list[Packet] = []
    graph.add(AvSource("src", str(path)))
    graph.add(CallbackSink("sink", got.append))
    graph.connect("src.video", "sink.in")
    graph.connect("src.audio", "sink.in")
    run = asyncio.create_task(graph.run())
    await asyncio.sleep(0.5)
    assert len(open_descriptors(path)) == 2, "one demuxer per stream"
    graph.stop()
    await asyncio.wait_for(run, 10)
    deadline = time.monotonic() + 2  # the decode thread gives up within 0.1 s of the stop
    while open_descriptors(path) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert got and open_descriptors(path) == []


async def test_real_clip_every_frame_with_its_y_plane(samples: Path) -> None:
    video, audio, counters = await replay(samples / "vtest.avi")
    assert len(video) == 795 and audio == []
    assert counters["frames"] == 795 and not counters.get("corrupt_packets")
    # The Y plane is the decoder's luma, uncopied: compare with the first rows of PyAV's
    # yuv420p array (its Y plane, then U and V).
    with av.open(str(samples / "vtest.avi")) as container:
        reference = [f.to_ndarray()[:576] for _, f in zip(range(3), container.decode(video=0), strict=False)]
    for ours, ref in zip(video[:3], reference, strict=True):
        assert ours.y.shape == (576, 768) and ours.y.dtype == np.uint8
        assert np.array_equal(ours.y, ref)
    assert video[0].rgb().shape == (576, 768, 3)
    # 10 fps: media time advances 100 ms per frame.
    assert [f.pts_ns for f in video[:4]] == [0, 100_000_000, 200_000_000, 300_000_000]


async def test_pts_monotonic_on_a_clip_with_out_of_order_timestamps(samples: Path) -> None:
    # Megamind.avi has packed B-frames: the decoder's timestamps go backwards now and then.
    video, audio, counters = await replay(samples / "Megamind.avi")
    assert len(video) == 270
    for kind in (video, audio):
        pts = [p.pts_ns for p in kind]
        assert all(b > a for a, b in itertools.pairwise(pts)), "pts must increase strictly"
    assert counters["pts_fixed"] > 0
    seqs = [p.seq for p in sorted([*video, *audio], key=lambda p: p.seq)]
    assert len(set(seqs)) == len(seqs)


async def test_real_ac3_stereo_audio_comes_out_16k_mono(samples: Path) -> None:
    _video, audio, _ = await replay(samples / "Megamind.avi")
    assert audio and all(c.samples.dtype == np.float32 and c.samples.ndim == 1 for c in audio)
    total = sum(len(c.samples) for c in audio)
    seconds = total / AUDIO_SAMPLE_RATE
    assert 10.5 < seconds < 11.5  # the clip's audio track lasts about 11 s
    # Contiguous timing: each chunk starts where the previous one ended.
    for a, b in itertools.pairwise(audio):
        assert abs(b.pts_ns - (a.pts_ns + a.duration_ns)) < 1_000_000


async def test_speech_lands_at_the_labelled_times(samples: Path) -> None:
    _, audio, _ = await replay(samples / "walkway_speech.mkv", video=False)
    labels = json.loads((samples / "walkway_speech.json").read_text())["speech"]
    samples_all = np.concatenate([c.samples for c in audio])
    start0 = audio[0].pts_ns
    rms = lambda a, b: float(np.sqrt(np.mean(samples_all[int(a * 16000) : int(b * 16000)] ** 2)))  # noqa: E731
    assert start0 == 0
    for label in labels:
        inside = rms(label["start_s"] + 0.2, label["end_s"] - 0.2)
        before = rms(label["start_s"] - 1.5, label["start_s"] - 0.1)
        assert inside > 10 * before, f"speech expected at {label['start_s']} s"


@pytest.mark.parametrize("rate,layout", [(44_100, "stereo"), (8_000, "mono"), (48_000, "5.1")])
async def test_generated_audio_is_resampled_to_16k_mono(tmp_path: Path, rate: int, layout: str) -> None:
    path = make_media(tmp_path / "clip.mkv", frames=50, fps=25, audio_rate=rate, audio_layout=layout)
    video, audio, _ = await replay(path)
    assert len(video) == 50
    total = sum(len(c.samples) for c in audio)
    assert abs(total - 2 * AUDIO_SAMPLE_RATE) < 0.05 * AUDIO_SAMPLE_RATE  # 2 s of tone
    tone = np.concatenate([c.samples for c in audio])[4000:-4000]
    peak = float(np.max(np.abs(tone)))
    assert 0.3 < peak <= 1.0, "the tone survives the downmix, within full scale"


async def test_random_bytes_give_a_one_line_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(1).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    with pytest.raises(NodeFailed) as err:
        await replay(junk)
    message = str(err.value.error)
    assert message.startswith(f"cannot open '{junk}':") and "\n" not in message


async def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(NodeFailed, match="no such file"):
        await replay(tmp_path / "absent.mkv")


async def test_truncated_file_delivers_what_it_can(tmp_path: Path) -> None:
    full = make_media(tmp_path / "full.ts", frames=100, container="mpegts")
    cut = tmp_path / "cut.ts"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 6 // 10])
    video, _, _ = await replay(cut)
    assert 30 < len(video) < 100


@pytest.mark.parametrize("audio_rate", [None, 44_100], ids=["video", "video+audio"])
async def test_corrupt_packets_are_counted_and_skipped(tmp_path: Path, audio_rate: int | None) -> None:
    path = make_media(tmp_path / "clip.ts", frames=100, container="mpegts", audio_rate=audio_rate)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(7)
    # Damage payload bytes inside a dozen transport packets in the middle of the file.
    for start in rng.integers(len(data) // 4, 3 * len(data) // 4, 12):
        data[start : start + 60] = rng.integers(0, 256, 60, dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged.ts"
    damaged.write_bytes(bytes(data))
    video, _, counters = await replay(damaged)
    assert len(video) > 50, "frames around the damage still arrive"
    assert counters.get("corrupt_packets", 0) + (100 - len(video)) > 0


def test_pts_sanitiser_repairs_gaps_jitter_and_restarts() -> None:
    fix = PtsSanitiser()
    values = [fix(p, 100) for p in [0, 100, None, 150, 150, 400, 50, 150]]
    assert values == [0, 100, 200, 201, 202, 400, 401, 402]
    restarted = fix(5, 100)  # a stream that started over at ~0 after 400 ns: small jump back
    assert restarted > 402
    big = PtsSanitiser()
    assert [big(p, 10) for p in [0, 5_000_000_000, 10]] == [0, 5_000_000_000, 5_000_000_010]


def test_backoff_doubles_up_to_its_cap_with_bounded_jitter() -> None:
    import random

    backoff = Backoff(initial_s=0.5, max_s=4.0, jitter=0.2)
    rng = random.Random(0)
    for failures, base in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0)]:
        delays = [backoff.delay(failures, rng) for _ in range(50)]
        assert all(0.8 * base <= d <= min(1.2 * base, 4.0) for d in delays), "never past max_s, jitter included"
        assert len(set(delays)) > 1, "jitter spreads a fleet's reconnects"
    at_cap = [backoff.delay(3000, rng) for _ in range(200)]  # hours of outage: no overflow, no lockstep
    assert all(3.2 <= d <= 4.0 for d in at_cap) and at_cap.count(4.0) < 5


async def test_a_server_that_accepts_but_never_answers_is_a_timeout_not_invalid_data(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import socket

    from stream_rt import CallbackSink, Graph

    silent, garbage = socket.socket(), socket.socket()
    for server in (silent, garbage):
        server.bind(("127.0.0.1", 0))
        server.listen(5)

    async def babble() -> None:  # answers every connection with bytes that are no RTSP
        loop = asyncio.get_running_loop()
        garbage.setblocking(False)
        while True:
            client, _ = await loop.sock_accept(garbage)
            await loop.sock_sendall(client, b"\x00\xff" * 4096)
            client.close()

    graph = Graph(drain_timeout_s=1)
    for name, server in (("silent", silent), ("garbage", garbage)):
        url = f"rtsp://127.0.0.1:{server.getsockname()[1]}/stream"
        graph.add(
            AvSource(
                name,
                url,
                audio=False,
                config=InputConfig(timeout_s=1, reconnect=BackoffConfig(initial_s=0.2, max_s=0.5, jitter=0.1)),
            )
        )
        graph.add(CallbackSink(f"sink_{name}", lambda p: None))
        graph.connect(f"{name}.video", f"sink_{name}.in")
    babbling = asyncio.create_task(babble())
    run = asyncio.create_task(graph.run())
    try:
        await asyncio.sleep(3)
    finally:
        graph.stop()
        await asyncio.wait_for(run, 10)
        babbling.cancel()
        silent.close()
        garbage.close()
    lines = {name: [r.getMessage() for r in caplog.records if f"source '{name}' offline" in r.getMessage()]
             for name in ("silent", "garbage")}  # fmt: skip
    assert lines["silent"] and all("no answer within 1 s (timeout)" in m for m in lines["silent"]), lines
    assert lines["garbage"] and not any("timeout" in m for m in lines["garbage"]), lines

"""Audio salience, fusion and the trigger policy, on real speech and real footage."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import av
import numpy as np
import pytest

from stream_rt import Config, ConfigError, Event, Salience, build_pipeline
from stream_rt.config import LOSSLESS_CHANNELS as LOSSLESS
from stream_rt.config import TriggerConfig, parse_config
from stream_rt.policies.trigger import TriggerPolicy
from stream_rt.testing import run_node


def salience(seq: int, t: float, score: float, source: str = "cam") -> Salience:
    return Salience(source, seq, int(t * 1e9), 0, score, {"visual": score})


async def trigger_events(scores: list[float], step_s: float = 0.1, **kwargs: object) -> tuple[list[Event], dict]:
    trigger = TriggerPolicy("trigger", TriggerConfig(**kwargs))  # type: ignore[arg-type]
    packets = [salience(i, i * step_s, s) for i, s in enumerate(scores)]
    out = await run_node(trigger, packets)
    events = [p for p in out["events"] if isinstance(p, Event)]
    return events, trigger


async def test_episode_opens_after_confirmation_and_ends_after_cutoff() -> None:
    scores = [0.0] * 5 + [0.9] * 30 + [0.4] * 20 + [0.1] * 40
    events, _ = await trigger_events(scores, confirm_s=0.2, cutoff_s=3.0, update_interval_s=100)
    assert [e.type for e in events] == ["new", "end"]
    new, end = events
    assert new.pts_ns == int(0.7e9), "opens once the score held 0.2 s"
    # Between off (0.3) and on (0.5) the episode stays open; 3 s below off ends it.
    assert end.reason == "quiet" and end.end_pts_ns == int(8.5e9)
    assert end.start_pts_ns == new.start_pts_ns and end.event_id == new.event_id


async def test_a_one_frame_blip_opens_nothing() -> None:
    events, _ = await trigger_events([0.0, 1.0, 0.0, 0.0, 1.0, 0.0], confirm_s=0.2)
    assert events == []


async def test_open_episodes_end_at_end_of_stream() -> None:
    events, _ = await trigger_events([0.9] * 20)
    assert [e.type for e in events] == ["new", "end"] and events[-1].reason == "end_of_stream"


async def test_updates_are_rate_limited_and_every_skip_is_counted() -> None:
    from stream_rt.graph import Graph, ManualClock
    from stream_rt.sinks import CallbackSink
    from stream_rt.testing import ListSource

    # 130 s of steady salience at 10 Hz: one episode, updates every 10 s at most, and a
    # budget of 2 calls per minute with a 30 s cooldown.
    class Feed(ListSource):
        outputs = {"out": (Salience,)}

    scores = [0.9] * 1300
    graph = Graph(clock=ManualClock())
    trigger = TriggerPolicy("trigger", TriggerConfig(update_interval_s=10, cooldown_s=30, max_calls_per_min=2))
    got: list[Event] = []
    graph.add(Feed("feed", [salience(i, i * 0.1, s) for i, s in enumerate(scores)]))
    graph.add(trigger)
    graph.add(CallbackSink("sink", got.append))  # type: ignore[arg-type]
    graph.connect("feed.out", "trigger.salience")
    graph.connect("trigger.events", "sink.in")
    await graph.run()
    counters = graph.statistics()["nodes"]["trigger"]
    updates = [e for e in got if e.type == "update"]
    assert len(updates) == 12, "one update per 10 s over 130 s"
    called = [e for e in got if e.call_model]
    assert all(b.pts_ns - a.pts_ns >= 30e9 for a, b in itertools.pairwise(called))
    assert counters["model_calls"] == len(called)
    assert counters["skip_cooldown"] + counters.get("skip_rate_limit", 0) == 13 - len(called)
    assert counters["skip_confirming"] == 1  # the first step above 'on' waits for confirm_s (0.1 s)


async def test_max_duration_ends_an_episode_that_never_calms_down() -> None:
    events, _ = await trigger_events([0.9] * 300, max_episode_s=10, update_interval_s=100)
    kinds = [(e.type, e.reason) for e in events]
    assert kinds[:3] == [("new", ""), ("end", "max_duration"), ("new", "")]
    assert sum(1 for e in events if e.type == "new") == sum(1 for e in events if e.type == "end")


def audio_only(path: Path) -> Config:
    return parse_config({"sources": [{"id": "mic", "url": str(path), "video": False}], "graph": LOSSLESS})


async def run_pipeline(config: Config) -> tuple[list[Event], dict]:
    pipeline = build_pipeline(config, speed=None)
    from stream_rt.sinks import CallbackSink

    got: list[Event] = []
    pipeline.graph.add(CallbackSink("collect", got.append))  # type: ignore[arg-type]
    pipeline.graph.connect("trigger.events", "collect.in", capacity=64)
    await pipeline.graph.run()
    return got, pipeline.graph.statistics()


async def test_real_speech_over_quiet_background_fires_at_the_labelled_times(samples: Path) -> None:
    labels = json.loads((samples / "walkway_speech.json").read_text())["speech"]
    events, stats = await run_pipeline(audio_only(samples / "walkway_speech.mkv"))
    news = [e for e in events if e.type == "new"]
    assert len(news) == len(labels), [e.pts_ns / 1e9 for e in news]
    for event, label in zip(news, labels, strict=True):
        latency = event.start_pts_ns / 1e9 - label["start_s"]
        assert -0.1 <= latency <= 0.3, f"speech at {label['start_s']} s opened an episode at {event.pts_ns / 1e9} s"
        assert event.components["speech"] > 0.5
    assert stats["nodes"]["audio"]["vad_skipped"] > stats["nodes"]["audio"]["vad_runs"], "quiet windows skip the VAD"


def write_audio(path: Path, samples: np.ndarray, rate: int = 16_000) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="mono")
        pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
        for start in range(0, len(pcm), 1024):
            frame = av.AudioFrame.from_ndarray(pcm[None, start : start + 1024], format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


async def test_noise_below_the_floor_margin_does_not_fire(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    quiet = rng.normal(0, 10 ** (-55 / 20), 16_000 * 20)
    quiet[16_000 * 8 : 16_000 * 12] *= 10 ** (4 / 20)  # a 4 dB rise: under the 6 dB gate
    events, stats = await run_pipeline(audio_only(write_audio(tmp_path / "hum.mkv", quiet)))
    assert events == []
    assert stats["nodes"]["audio"].get("vad_runs", 0) == 0


@pytest.mark.parametrize("silence_at", [0.0, 8.0], ids=["priming", "mute"])
async def test_digital_silence_does_not_make_the_room_loud(tmp_path: Path, silence_at: float) -> None:
    """Two seconds of exact zeros (an encoder's priming at the start, a muted input later)
    in a quiet room's noise: the noise after them opens nothing."""
    rng = np.random.default_rng(6)
    room = rng.normal(0, 10 ** (-60 / 20), 16_000 * 20)
    start = int(silence_at * 16_000)
    room[start : start + 32_000] = 0.0
    events, _ = await run_pipeline(audio_only(write_audio(tmp_path / "room.mkv", room)))
    assert events == []


async def test_a_person_who_stops_moving_does_not_cause_an_update_storm(samples: Path, tmp_path: Path) -> None:
    # Real footage: an empty-looking frame of the walkway, then a real pedestrian patch
    # pasted in and left standing still for 60 s, with sensor noise throughout.
    with av.open(str(samples / "vtest.avi")) as container:
        planes = [f.to_ndarray(format="rgb24") for _, f in zip(range(300), container.decode(video=0), strict=False)]
    scene, person = planes[0][100:388, 200:584], planes[150][150:330, 300:380]
    rng = np.random.default_rng(2)
    path = tmp_path / "still_person.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = scene.shape[1], scene.shape[0], "yuv420p"
        stream.options = {"qscale": "3"}
        stream.codec_context.thread_count = 1  # a deterministic encode
        for i in range(800):
            img = scene.copy()
            if i >= 100:
                img[60:240, 150:230] = person
            noisy = np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(noisy, format="rgb24")))
        out.mux(stream.encode(None))
    config = parse_config(
        {
            "sources": [{"id": "cam", "url": str(path), "audio": False}],
            "trigger": {"update_interval_s": 5},
            "graph": LOSSLESS,
        }
    )
    events, _ = await run_pipeline(config)
    kinds = [e.type for e in events]
    assert kinds.count("new") == 1 and kinds.count("end") == 1
    assert kinds.count("update") <= 2, "the background absorbs a person who stands still"
    end = next(e for e in events if e.type == "end")
    assert end.reason == "quiet" and end.end_pts_ns < 40e9


async def test_without_the_vad_the_audio_gate_still_runs_on_cheap_features(samples: Path) -> None:
    config = parse_config(
        {"sources": [{"id": "mic", "url": str(samples / "walkway_speech.mkv"), "video": False}],
         "graph": LOSSLESS, "audio": {"vad": False}}
    )  # fmt: skip
    _, stats = await run_pipeline(config)
    assert "vad_runs" not in stats["nodes"]["audio"]
    assert stats["nodes"]["salience"]["processed"] > 2000


async def test_events_carry_jpeg_snapshots_written_beside_the_log(samples: Path, tmp_path: Path) -> None:
    import io

    config = parse_config(
        {"sources": [{"id": "cam", "url": str(samples / "still_motion.mkv"), "audio": False}], "graph": LOSSLESS,
         "trigger": {"snapshot": True},
         "sinks": {"jsonl": {"path": str(tmp_path / "events.jsonl"), "snapshots_dir": str(tmp_path / "snaps")}}}
    )  # fmt: skip
    events, _ = await run_pipeline(config)
    rows = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    with_snapshot = [r for r in rows if r.get("kind") == "Event" and r["type"] != "end"]
    assert with_snapshot and all(r["snapshot_bytes"] > 1000 for r in with_snapshot)
    for row in with_snapshot:
        with av.open(io.BytesIO(Path(row["snapshot"]).read_bytes())) as jpeg:
            image = next(jpeg.decode(video=0))
        assert (image.width, image.height) == (768, 576)
    assert all(e.snapshot_jpeg is None for e in events if e.type == "end")


async def test_a_synthetic_source_from_the_config_runs_every_stage(tmp_path: Path) -> None:
    url = "synthetic:?frames=1200&fps=10&width=64&height=48&active_s=5&period_s=30"
    config = parse_config({"sources": [{"id": "load", "url": url}], "graph": LOSSLESS,
                           "sinks": {"jsonl": {"path": str(tmp_path / "events.jsonl")}}})  # fmt: skip
    pipeline = build_pipeline(config, speed=None)
    await pipeline.graph.run()
    records = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    starts = [r["pts_ns"] / 1e9 for r in records if r["kind"] == "Event" and r["type"] == "new"]
    # 120 s of media, the square moves and the tone sounds 5 s of every 30 s; the first
    # stretch is the source's start-up, which teaches change detection what is busy.
    assert [round(s // 30) for s in starts] == [1, 2, 3] and all(s % 30 < 5 for s in starts)
    assert next(r["state"] for r in records if r["kind"] == "SourceStatus") == "online"
    for url, error in [("synthetic:?frames=10&colour=red", "unknown synthetic source parameter 'colour'"),
                       ("synthetic:?fps=fast", "fps='fast' is not a float")]:  # fmt: skip
        with pytest.raises(ConfigError, match=error):
            parse_config({"sources": [{"id": "load", "url": url}]})

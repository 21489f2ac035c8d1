"""What was said: the speech the VAD finds is transcribed by PocketSphinx (the real
English model inside its wheel), words stamped with media time, carried by events, quoted
in the model's request and published on MQTT."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_rt import build_pipeline, parse_config
from stream_rt.config import AudioGateConfig, TranscriptionConfig
from stream_rt.graph import Graph, ReplayClock
from stream_rt.graph.node import Context, Source
from stream_rt.graph.packets import (
    ALL_TRANSCRIBED_NS,
    AudioChunk,
    AudioFeatures,
    EndOfStream,
    Event,
    Packet,
    StreamEnded,
    TranscribedUntil,
    Transcript,
    Word,
)
from stream_rt.operators import transcription
from stream_rt.operators.audio import AudioAnalyzer
from stream_rt.operators.recognizers import RecognizerUnavailable, load_recognizer
from stream_rt.operators.transcription import Transcriber
from stream_rt.policies.heard import HeardWords
from stream_rt.sinks.callback import CallbackSink
from stream_rt.testing import Broker, Subscriber, chat_server, run_node

from .test_cli import run_cli
from .test_mqtt import wait_until

CLIP = "walkway_speech.mkv"


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32) / 32768.0


async def replay(samples: Path, tmp_path: Path, **sections: Any) -> list[dict[str, Any]]:
    """Replay the walkway clip with speech as fast as possible; the JSONL records."""
    return (await replay_counted(samples, tmp_path, **sections))[0]


async def replay_counted(samples: Path, tmp_path: Path, **sections: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """As :func:`replay`, with the transcriber's counters."""
    out = tmp_path / "out.jsonl"
    config = parse_config({
        "sources": [{"id": "walkway", "url": str(samples / CLIP)}],
        "sinks": {"jsonl": {"path": str(out)}},
        **sections,
    })  # fmt: skip
    graph = build_pipeline(config, speed=None).graph
    await graph.run()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return records, graph.statistics()["nodes"].get("transcription", {})


def test_pocketsphinx_hears_read_speech_with_word_times(samples: Path) -> None:
    recognizer = load_recognizer(TranscriptionConfig())
    speech = read_wav(samples / "speech_0930.wav")  # "he might even have been made amiable himself"
    words = recognizer.recognize(speech)
    said = [w for w, _, _, _ in words]
    assert {"he", "might", "even", "have", "been", "made", "himself"} <= set(said), said
    starts = [a for _, a, _, _ in words]
    assert starts == sorted(starts) and all(a < b for _, a, b, _ in words)
    assert 0 < starts[0] < words[-1][2] <= len(speech) / 16000


def test_a_recognizer_that_cannot_be_used_is_one_clear_line(tmp_path: Path) -> None:
    for config, message in [
        (TranscriptionConfig(language="de"), "pocketsphinx's own model is English"),
        (TranscriptionConfig(model_dir=tmp_path), "has no an acoustic model"),
        (TranscriptionConfig(engine="faster-whisper"), "faster-whisper"),
    ]:
        with pytest.raises(RecognizerUnavailable, match=message):
            load_recognizer(config)


def test_the_daemon_refuses_an_unusable_recognizer_in_one_line(samples: Path, tmp_path: Path) -> None:
    config = tmp_path / "de.toml"
    config.write_text(f'[[sources]]\nid = "walkway"\nurl = "{samples / CLIP}"\n[transcription]\nlanguage = "de"\n')
    result = run_cli("run", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "stream-rt: pocketsphinx's own model is English; for language 'de' set [transcription] model_dir to a "
        "pocketsphinx model folder (or set [transcription] enabled = false)"
    ], result.stderr


async def test_each_stretch_of_speech_is_transcribed_at_its_media_time(samples: Path, tmp_path: Path) -> None:
    records = await replay(samples, tmp_path)
    labels = json.loads((samples / "walkway_speech.json").read_text())["speech"]
    transcripts = [r for r in records if r["kind"] == "Transcript"]
    assert len(transcripts) == len(labels), [(t["pts_ns"], t["text"]) for t in transcripts]
    for transcript, label in zip(transcripts, labels, strict=True):
        assert abs(transcript["pts_ns"] / 1e9 - label["start_s"]) <= 0.3, (transcript["pts_ns"], label)
        assert abs(transcript["end_ns"] / 1e9 - label["end_s"]) <= 0.3, (transcript["end_ns"], label)
        words = transcript["words"]
        assert len(words) >= 5 and transcript["engine"] == "pocketsphinx"
        assert label["start_s"] - 0.3 <= words[0]["start_ns"] / 1e9 < words[-1]["end_ns"] / 1e9 <= label["end_s"] + 0.3
    assert "amiable" in transcripts[3]["text"]  # "had he married a more amiable woman ..."


async def test_an_episodes_events_carry_what_was_said_once_each_in_order(samples: Path, tmp_path: Path) -> None:
    records = await replay(samples, tmp_path)
    said = [w for r in records if r["kind"] == "Transcript" for w in r["words"]]
    events = [r for r in records if r["kind"] == "Event"]
    carried = [w for e in events for w in e["words"]]
    assert carried == said, "every word in one event of its episode, in order"
    for event in events:
        if event["words"]:
            assert event["type"] in ("update", "end")
            assert event["transcript"] == " ".join(w["word"] for w in event["words"])
            assert all(event["start_pts_ns"] <= w["start_ns"] < event["pts_ns"] for w in event["words"])
    assert events[0]["type"] == "new" and not events[0]["words"]


async def test_transcription_can_be_turned_off(samples: Path, tmp_path: Path) -> None:
    off = await replay(samples, tmp_path, transcription={"enabled": False})
    assert not [r for r in off if r["kind"] == "Transcript"] and not any(r.get("words") for r in off)
    assert [r for r in off if r["kind"] == "Event"]


def read_speech(samples: Path) -> tuple[list[Packet], list[Packet]]:
    """The five LibriVox clips, a second of quiet after each, as 0.1 s chunks, with the
    audio analyser's features of them (the VAD's speech probabilities)."""
    quiet = np.random.default_rng(0).normal(0, 10 ** (-60 / 20), 16000).astype(np.float32)
    audio = np.concatenate([part for n in (870, 880, 890, 920, 930)
                            for part in (read_wav(samples / f"speech_{n:04d}.wav"), quiet)])  # fmt: skip
    chunks = [AudioChunk("mic", i, i * 100_000_000, 0, audio[i * 1600 : (i + 1) * 1600])
              for i in range(len(audio) // 1600)]  # fmt: skip
    analyzer = AudioAnalyzer("audio", AudioGateConfig(vad=True))
    features: list[Packet] = [f for chunk in chunks for f in analyzer.analyse(chunk)]
    ended = chunks[-1].pts_ns + chunks[-1].duration_ns
    # What the pipeline sends as the source ends: its audio's end, and the analyser's.
    return [*chunks, EndOfStream("mic", -1, ended, 0)], [*features, StreamEnded("mic", -1, -1, 0, "eof")]


@pytest.mark.parametrize("live", [True, False])
async def test_a_backlog_of_speech_is_skipped_live_and_waited_for_in_a_recording(
    samples: Path, live: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Speech fed faster than it is recognised, in 2 s stretches, with at most 2 s waiting:
    a live source skips the oldest waiting speech and says so; a recording waits, and
    every word is heard."""
    chunks, features = read_speech(samples)
    transcriber = Transcriber("transcription")
    transcriber.configure("mic", TranscriptionConfig(max_stretch_s=2, max_backlog_s=2), live=live)
    graph_out = await run_node(transcriber, {"audio": chunks, "features": features})
    transcripts = [p for p in graph_out["transcripts"] if isinstance(p, Transcript)]
    marks = [p.pts_ns for p in graph_out["words"] if isinstance(p, TranscribedUntil)]
    assert marks == sorted(marks) and marks[-1] == ALL_TRANSCRIBED_NS, "the marks move on to the end either way"
    heard = " ".join(t.text for t in transcripts)
    if live:
        assert 1 <= len(transcripts) < 10, heard
        assert "transcription of 'mic' cannot keep up: speech at" in caplog.text
    else:
        assert len(transcripts) >= 10, heard
        assert all(w in heard.split() for w in ("consider", "power", "selfish", "married", "even")), heard
        words = [w for t in transcripts for w in t.words]
        assert all(a.end_ns <= b.start_ns for a, b in itertools.pairwise(words)), "no word heard twice at a cut"


async def test_the_model_is_told_what_was_said(samples: Path, tmp_path: Path, free_port: int) -> None:
    prompts: list[str] = []

    def reply(body: dict[str, Any]) -> str:
        content = body["messages"][-1]["content"]
        prompts.append(" ".join(part.get("text", "") for part in content if isinstance(part, dict)))
        return '{"summary": "a walkway", "condition_met": null, "confidence": 0.5}'

    runner = await chat_server(free_port, reply)
    try:
        records = await replay(samples, tmp_path, mllm={
            "backend": "openai", "url": f"http://127.0.0.1:{free_port}/v1", "model": "m", "flow": "block",
        }, trigger={"max_calls_per_min": 600, "cooldown_s": 0})  # fmt: skip
    finally:
        await runner.cleanup()
    heard = [p for p in prompts if "Heard (speech recognition" in p]
    assert heard, prompts
    update = next(e for e in records if e["kind"] == "Event" and e["words"])
    assert f'"{update["transcript"]}"' in "".join(heard)


async def test_transcripts_reach_mqtt_through_the_outbox(samples: Path, tmp_path: Path, free_port: int) -> None:
    broker = Broker(free_port, tmp_path)
    broker.start()
    subscriber = Subscriber(free_port)
    try:
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        await replay(samples, tmp_path, sinks={
            "jsonl": {"path": str(tmp_path / "out.jsonl")},
            "mqtt": {"port": free_port, "outbox": str(tmp_path / "outbox.sqlite")},
        })  # fmt: skip
        await wait_until(lambda: len(subscriber.payloads("/walkway/transcript")) == 5, 10, "the transcripts")
    finally:
        await subscriber.close()
        broker.kill()
    texts = [t["text"] for t in subscriber.payloads("/walkway/transcript")]
    assert "amiable" in texts[3] and all(texts), texts


class _Feed(Source):
    """Sends ``packets`` (each made when sent: its wall time is the clock's; a number is a
    pause of that many seconds), then stays open ``open_s`` before it ends, as a live
    source's edges do."""

    def __init__(
        self, name: str, packets: list[Callable[[int], Packet] | float], open_s: float, types: tuple[type, ...]
    ) -> None:
        super().__init__(name)
        self.outputs = {"out": types}
        self.packets, self.open_s = packets, open_s

    async def run(self, ctx: Context) -> None:
        for make in self.packets:
            if isinstance(make, float | int):
                await ctx.clock.sleep(make)
            else:
                await ctx.emit("out", make(ctx.clock.wall_ns()))
        await ctx.clock.sleep(self.open_s)


S = 1_000_000_000


def _event(kind: str, pts: int, question: str | None = None) -> Callable[[int], Event]:
    return lambda wall: Event("cam", pts, pts, wall, kind, "cam-1", 1 * S, None, 0.9, 0.9, {}, (), True, question)


async def _words_of_events(
    events: list[Callable[[int], Packet] | float], words: list[Callable[[int], Packet] | float], wait_s: float | None
) -> list[tuple[float, Event]]:
    """The events as :class:`HeardWords` lets them go (with the monotonic time of each),
    fed ``events`` and the transcriber's ``words`` on a live clock."""
    heard = HeardWords("words")
    heard.expect("cam", wait_s)
    graph = Graph(clock=ReplayClock(1.0))
    graph.add(heard)
    graph.add(_Feed("feed_words", words, 1.5, (Transcript, TranscribedUntil)))
    graph.add(_Feed("feed_events", events, 0.0, (Event,)))
    arrived: list[tuple[float, Event]] = []
    graph.add(CallbackSink("out", lambda e: arrived.append((time.monotonic(), e))))
    graph.connect("feed_words.out", "words.words")
    graph.connect("feed_events.out", "words.events")
    graph.connect("words.events", "out.in")
    await graph.run()
    statistics.update(graph.statistics()["nodes"]["words"])
    return arrived


statistics: dict[str, Any] = {}


@pytest.mark.parametrize("wait_s", [0.3, None])
async def test_an_update_waits_for_its_words_bounded_on_a_live_source(wait_s: float | None) -> None:
    """The transcriber has passed 3 s only; an update at 5 s waits for the words up to 5 s:
    live, at most ``wait_s`` (then it goes on with those known); from a file, until the
    transcriber's edge ends."""
    said = Word("hello", 2 * S, 2 * S + 400_000_000, 0.9)
    words: list[Callable[[int], Packet] | float] = [
        lambda wall: Transcript("cam", 0, 2 * S, wall, 3 * S, (said,), "pocketsphinx", "en"),
        lambda wall: TranscribedUntil("cam", 0, 3 * S, wall),
    ]
    started = time.monotonic()
    (_, new), (at, update) = await _words_of_events([_event("new", 1 * S), _event("update", 5 * S)], words, wait_s)
    assert new.type == "new" and not new.words
    assert update.type == "update" and update.words == (said,)
    if wait_s is not None:
        assert wait_s <= at - started < 1.2, "let go after wait_s, before the edge ended"
        assert statistics["words_late"] == 1
    else:
        assert at - started >= 1.4, "a recording's event waits for the transcriber"


async def test_words_too_late_for_their_event_go_with_the_next_one() -> None:
    """Live, an update at 5 s goes on without the words said at 2 s (they come 0.5 s after
    its wait of 0.2 s): the episode's end carries them, with its own."""
    early, later = Word("hello", 2 * S, 2 * S + 400_000_000, 0.9), Word("there", 6 * S, 6 * S + 300_000_000, 0.9)
    words: list[Callable[[int], Packet] | float] = [
        0.5,
        lambda wall: Transcript("cam", 0, 2 * S, wall, 3 * S, (early,), "pocketsphinx", "en"),
        lambda wall: Transcript("cam", 1, 6 * S, wall, 7 * S, (later,), "pocketsphinx", "en"),
        lambda wall: TranscribedUntil("cam", 0, 9 * S, wall),
    ]
    events = [_event("new", 1 * S), _event("update", 5 * S), 0.7, _event("end", 8 * S)]
    (_, new), (_, update), (_, end) = await _words_of_events(events, words, 0.2)
    assert (new.words, update.words) == ((), ())
    assert end.type == "end" and end.words == (early, later)


async def test_an_ask_carries_what_was_just_said() -> None:
    """An ask at 40 s goes on at once (no wait) with the words of the 30 s before it that
    are known; an episode's later events still carry their own words."""
    old, recent = Word("earlier", 5 * S, 5 * S + 300_000_000, 0.9), Word("stop", 38 * S, 38 * S + 300_000_000, 0.9)
    words: list[Callable[[int], Packet] | float] = [
        lambda wall: Transcript("cam", 0, 5 * S, wall, 6 * S, (old,), "pocketsphinx", "en"),
        lambda wall: Transcript("cam", 1, 38 * S, wall, 39 * S, (recent,), "pocketsphinx", "en"),
        lambda wall: TranscribedUntil("cam", 0, 39 * S, wall),
    ]
    started = time.monotonic()
    events = [0.1, _event("ask", 40 * S, "what did they say?"), _event("end", 39 * S)]
    (at, ask), (_, end) = await _words_of_events(events, words, 5.0)
    assert ask.type == "ask" and ask.words == (recent,) and at - started < 1.0
    assert end.words == (old, recent), "an ask takes no word from the episode"


async def test_speech_cut_off_by_an_outage_is_not_joined_to_what_follows(samples: Path) -> None:
    """A live source's audio breaks off for 3 s in the middle of the second clip: its
    speech before the break is one stretch, what is said after it another, and no word is
    stamped inside the break."""
    chunks, features = read_speech(samples)
    gap = (6 * S, 9 * S)
    inside = lambda p: isinstance(p, AudioChunk | AudioFeatures) and gap[0] <= p.pts_ns < gap[1]  # noqa: E731
    transcriber = Transcriber("transcription")
    transcriber.configure("mic", TranscriptionConfig(), live=True)
    out = await run_node(transcriber, {
        "audio": [p for p in chunks if not inside(p)], "features": [f for f in features if not inside(f)],
    })  # fmt: skip
    transcripts = [p for p in out["transcripts"] if isinstance(p, Transcript)]
    assert any(t.end_ns <= gap[0] + S for t in transcripts) and any(t.pts_ns >= gap[1] - S for t in transcripts)
    assert not [t for t in transcripts if t.pts_ns < gap[0] and t.end_ns > gap[1]], "no stretch spans the break"
    assert not [w for t in transcripts for w in t.words if gap[0] <= w.start_ns < gap[1]]


async def test_a_hung_recognizer_is_started_again(
    samples: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The recogniser's process stops (SIGSTOP) before its first stretch: that stretch is
    given up after the hang limit, said in one line, and the next ones are heard by a new
    process."""
    import multiprocessing
    import os
    import signal

    monkeypatch.setattr(transcription, "HUNG_AFTER_S", 8.0)
    monkeypatch.setattr(transcription, "HUNG_PER_SPEECH_S", 0.0)
    chunks, features = read_speech(samples)
    transcriber = Transcriber("transcription")
    transcriber.configure("mic", TranscriptionConfig(), live=False)
    stopped: list[int] = []
    earlier = {child.pid for child in multiprocessing.active_children()}  # other tests' recognisers, going

    async def stop_the_first_recognizer() -> None:
        while not stopped:
            for child in multiprocessing.active_children():
                if child.pid is not None and child.pid not in earlier:
                    os.kill(child.pid, signal.SIGSTOP)
                    stopped.append(child.pid)
            await asyncio.sleep(0.01)

    stopping = asyncio.create_task(stop_the_first_recognizer())
    out = await run_node(transcriber, {"audio": chunks, "features": features})
    stopping.cancel()
    transcripts = [p for p in out["transcripts"] if isinstance(p, Transcript)]
    assert "transcribing mic at" in caplog.text and "the recogniser hung" in caplog.text
    assert len(transcripts) >= 3 and "married" in " ".join(t.text for t in transcripts)
    assert stopped[0] not in [c.pid for c in multiprocessing.active_children()], "the hung process is gone"

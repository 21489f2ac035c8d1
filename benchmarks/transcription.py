#!/usr/bin/env python3
"""Transcription: how well the default recogniser (PocketSphinx, its own English model)
hears, what it costs, and what it costs perception.

1. Word error rate on the five real LibriVox clips of Debian's ``pocketsphinx-testdata``
   (``samples/speech_*.wav``) against the package's reference transcription
   (``samples/speech_transcription.txt``): each clip recognised whole, as one stretch;
   jiwer's WER (substitutions, deletions and insertions over the reference's words), both
   lowercased, ``<s>``/``</s>`` dropped. The reference spells "mister" where the model
   writes "mr": counted as an error, as any scorer would.
2. Real-time factor: CPU seconds per second of speech, one thread, each clip recognised
   ``--rounds`` times (median).
3. Share of one core at live pace: the walkway sample (79.5 s, five stretches of speech)
   replayed at 1x through the default pipeline: the recogniser's CPU time (its process's,
   counter ``recognizer_cpu_ms``) over the media time.
4. Perception with transcription on and off, in one run: the walkway sample replayed as
   fast as possible with lossless channels (as ``stream-rt replay`` does), on and off
   alternating ``--rounds`` times. Perception's frames per second: the frames over the
   time from the start to the last change map out of change detection; the ratio of the
   medians (target: at least 0.95). Beside it, the whole run's wall time: a recording's
   replay ends once the last words are transcribed (its events wait for them), so as fast
   as possible it lasts at least the recogniser's time for all the speech.
5. Perception at live pace, transcription off then on: ``--live-sources`` copies of the
   walkway sample (default 4) replayed together at 1x with the default channels (a stage
   that falls behind sees only the latest frame): the share of decoded frames change
   detection saw, and its ratio on/off (target: at least 0.95).

Usage: python benchmarks/transcription.py [--rounds 3] [--skip-live] [--live-sources 4]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
import wave
from pathlib import Path
from typing import Any

import jiwer
import numpy as np

from stream_rt import CallbackSink, build_pipeline, parse_config
from stream_rt.config import LOSSLESS_CHANNELS, TranscriptionConfig
from stream_rt.operators.recognizers import load_recognizer

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
CLIPS = (870, 880, 890, 920, 930)


def say(message: str) -> None:
    print(f"transcription: {message}", file=sys.stderr, flush=True)


def references() -> dict[int, str]:
    """Each clip's words, from the package's reference transcription."""
    out = {}
    for line in (SAMPLES / "speech_transcription.txt").read_text().splitlines():
        if match := re.match(r"<s> (.*) </s> \(.*-(\d{4})\)$", line.strip()):
            out[int(match.group(2))] = match.group(1).lower()
    return out


def read_wav(n: int) -> np.ndarray:
    with wave.open(str(SAMPLES / f"speech_{n:04d}.wav")) as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32) / 32768.0


def accuracy_and_cost(rounds: int) -> dict[str, Any]:
    recognizer = load_recognizer(TranscriptionConfig())
    said = references()
    clips, hypotheses, cpu, speech_s = {}, [], [], 0.0
    for n in CLIPS:
        audio = read_wav(n)
        times = []
        for _ in range(rounds):
            start = time.process_time()
            words = recognizer.recognize(audio)
            times.append(time.process_time() - start)
        heard = " ".join(w for w, _, _, _ in words).lower()
        hypotheses.append(heard)
        seconds = len(audio) / 16000
        speech_s += seconds
        cpu.append(statistics.median(times))
        clips[f"{n:04d}"] = {"wer": round(jiwer.wer(said[n], heard), 3), "heard": heard, "said": said[n]}
        say(f"clip {n:04d}: WER {clips[f'{n:04d}']['wer']:.2f}  heard: {heard}")
    return {
        "wer": round(jiwer.wer([said[n] for n in CLIPS], hypotheses), 3),
        "reference_words": sum(len(said[n].split()) for n in CLIPS),
        "real_time_factor": round(sum(cpu) / speech_s, 3),
        "speech_s": round(speech_s, 1),
        "clips": clips,
    }


async def replay(speed: float | None, transcribe: bool) -> tuple[float, float, dict[str, Any]]:
    """Wall seconds of one replay of the walkway sample, to its last change map and to its
    end, and its statistics."""
    config = parse_config({
        "sources": [{"id": "walkway", "url": str(SAMPLES / "walkway_speech.mkv")}],
        "graph": LOSSLESS_CHANNELS,
        "transcription": {"enabled": transcribe},
    })  # fmt: skip
    pipeline = build_pipeline(config, speed=speed)
    perceived: list[float] = []
    pipeline.graph.add(CallbackSink("perceived", lambda _: perceived.append(time.perf_counter())))
    pipeline.graph.connect("change.changes", "perceived.in", capacity=64)
    start = time.perf_counter()
    await pipeline.graph.run()
    return perceived[-1] - start, time.perf_counter() - start, pipeline.graph.statistics()


def live_share() -> dict[str, Any]:
    say("replaying the walkway sample at 1x (80 s)")
    _, wall, stats = asyncio.run(replay(1.0, True))
    heard = stats["nodes"]["transcription"]
    media_s = stats["nodes"]["walkway"]["frames"] / 10  # 10 fps
    return {
        "media_s": round(media_s, 1),
        "wall_s": round(wall, 1),
        "speech_transcribed_s": heard.get("speech_transcribed_ms", 0) / 1000,
        "recognizer_cpu_s": heard.get("recognizer_cpu_ms", 0) / 1000,
        "share_of_one_core": round(heard.get("recognizer_cpu_ms", 0) / 1000 / media_s, 4),
        "skipped_s": heard.get("speech_skipped_ms", 0) / 1000,
    }


async def paced(transcribe: bool, sources: int) -> dict[str, Any]:
    """``sources`` copies of the walkway sample replayed together at 1x with the default
    channels (video into slow stages keeps only the latest frame, as for cameras): how many
    of their frames perception saw, and the statistics."""
    config = parse_config({
        "sources": [{"id": f"cam{i}", "url": str(SAMPLES / "walkway_speech.mkv")} for i in range(sources)],
        "transcription": {"enabled": transcribe},
    })  # fmt: skip
    pipeline = build_pipeline(config, speed=1.0)
    maps = [0]
    pipeline.graph.add(CallbackSink("perceived", lambda _: maps.__setitem__(0, maps[0] + 1)))
    pipeline.graph.connect("change.changes", "perceived.in", capacity=64)
    start = time.perf_counter()
    await pipeline.graph.run()
    stats = pipeline.graph.statistics()
    frames = sum(stats["nodes"][f"cam{i}"]["frames"] for i in range(sources))
    heard = stats["nodes"].get("transcription", {})
    return {"frames": frames, "perceived": maps[0], "seen_share": round(maps[0] / frames, 4),
            "wall_s": round(time.perf_counter() - start, 1),
            "recognizer_cpu_s": heard.get("recognizer_cpu_ms", 0) / 1000}  # fmt: skip


def perception_at_live_pace(sources: int) -> dict[str, Any]:
    """Perception at the pace people run it: the share of frames it saw, transcription on
    vs off, ``sources`` speech sources at 1x (one after the other, off first)."""
    say(f"replaying {sources} copies of the walkway sample at 1x, transcription off then on (2 x 80 s)")
    off = asyncio.run(paced(False, sources))
    on = asyncio.run(paced(True, sources))
    return {"sources": sources, "off": off, "on": on, "ratio_on_off": round(on["seen_share"] / off["seen_share"], 4)}


def perception(rounds: int) -> dict[str, Any]:
    fps: dict[str, list[float]] = {"on": [], "off": []}
    run_s: dict[str, list[float]] = {"on": [], "off": []}
    for k in range(rounds):
        for mode in ("on", "off") if k % 2 == 0 else ("off", "on"):
            perceived, wall, stats = asyncio.run(replay(None, mode == "on"))
            fps[mode].append(round(stats["nodes"]["walkway"]["frames"] / perceived, 1))
            run_s[mode].append(round(wall, 2))
            say(f"round {k + 1}, transcription {mode}: perception {fps[mode][-1]:.0f} fps, run {wall:.2f} s")
    on, off = statistics.median(fps["on"]), statistics.median(fps["off"])
    return {"perception_fps_on": on, "perception_fps_off": off, "ratio_on_off": round(on / off, 3),
            "run_s_on": statistics.median(run_s["on"]), "run_s_off": statistics.median(run_s["off"]),
            "runs": {"fps": fps, "run_s": run_s}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-live", action="store_true", help="leave out the replays at live pace (4 min)")
    parser.add_argument("--live-sources", type=int, default=4, help="speech sources replayed together at 1x")
    args = parser.parse_args()
    figures: dict[str, Any] = {"accuracy_and_cost": accuracy_and_cost(args.rounds)}
    if not args.skip_live:
        figures["live_pace"] = live_share()
        figures["perception_live_pace"] = perception_at_live_pace(args.live_sources)
    figures["perception"] = perception(args.rounds)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Fetch the real recordings that stream_rt's tests, evaluations and benchmarks use.

They come from three Debian packages, downloaded with ``apt-get download`` and unpacked
with ``dpkg -x`` (nothing is installed):

- ``opencv-doc``: real camera clips (``vtest.avi``: a fixed camera over a walkway with
  pedestrians, 768x576, 10 fps, 79.5 s; ``Megamind.avi``: a film clip with AC-3 stereo
  audio; ``Megamind_bugy.avi``: the same clip with damaged packets; ``tree.avi``: a
  handheld camera moving along a tree).
- ``pocketsphinx-testdata``: real read speech, 16 kHz mono WAV, with what is said in each
  (``speech_transcription.txt``, the package's reference transcription).
- ``node-opencv`` (MIT): ``pen.mov``, a real camera over a table: a pen comes in, pushes
  a coin about and leaves, while auto-exposure drifts (568x320, 30 fps, 8 s).

Then it builds ``walkway_speech.mkv``: the vtest video, untouched, with an audio track of
quiet background noise and real speech clips placed at known times, its audio and video
packets stored interleaved in time order. ``walkway_speech.json`` lists each clip's
placement and its spoken span (10 ms RMS above -35 dBFS): the labels that evaluations
score against. ``walkway_speech_late.mkv`` holds the very same packets with all the audio
stored after all the video (see :func:`remux_audio_late`), as a recorder that writes in
large chunks may leave them: a reader must not let file order stand for media time.

It also builds ``still_motion.mkv`` (see :func:`build_still_motion`), the evaluation clip
of long still stretches cut with real motion, and ``walkway_light.mkv`` (see
:func:`build_walkway_light`): the walkway moving and standing still in turns under light
that changes at known times.

Usage: ``python scripts/fetch_samples.py [--dest DIR]`` (default ``samples/`` in the repo,
or ``$STREAM_RT_SAMPLES``). Files already present are kept; ``--force`` rebuilds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import wave
from collections.abc import Iterable, Iterator
from pathlib import Path

import av
import numpy as np

from stream_rt.testing.media import audio_lag_s, remux_audio_late

LIBRIVOX = "usr/share/pocketsphinx/test/data/librivox"
PACKAGES = {
    "opencv-doc": {
        "usr/share/doc/opencv-doc/examples/data/vtest.avi": "vtest.avi",
        "usr/share/doc/opencv-doc/examples/data/Megamind.avi": "Megamind.avi",
        "usr/share/doc/opencv-doc/examples/data/Megamind_bugy.avi": "Megamind_bugy.avi",
        "usr/share/doc/opencv-doc/examples/data/tree.avi": "tree.avi",
    },
    "node-opencv": {"usr/share/doc/node-opencv/examples/files/motion.mov": "pen.mov"},
    "pocketsphinx-testdata": {
        **{
            f"{LIBRIVOX}/sense_and_sensibility_01_austen_64kb-{n:04d}.wav": f"speech_{n:04d}.wav"
            for n in (870, 880, 890, 920, 930)
        },
        f"{LIBRIVOX}/transcription": "speech_transcription.txt",  # what each is, word for word
    },
}

# (start time in the AV sample, speech file): speech lands on these media times exactly.
SPEECH_PLACEMENT = [
    (8.0, "speech_0870.wav"),
    (24.0, "speech_0880.wav"),
    (41.0, "speech_0890.wav"),
    (57.0, "speech_0920.wav"),
    (70.0, "speech_0930.wav"),
]
NOISE_DBFS = -55.0
SAMPLE_RATE = 16_000


def default_dest() -> Path:
    env = os.environ.get("STREAM_RT_SAMPLES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "samples"


def fetch_packages(dest: Path, force: bool) -> None:
    for package, files in PACKAGES.items():
        if not force and all((dest / name).exists() for name in files.values()):
            print(f"  {package}: already here")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            print(f"  {package}: downloading with apt-get download ...", flush=True)
            result = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob(f"{package}_*.deb"))
            if not debs:
                detail = result.stderr.strip().splitlines()[-1:] or ["no .deb produced"]
                sys.exit(
                    f"fetch_samples: cannot download {package}: {detail[0]} "
                    "(is this a Debian-based system? try 'apt-get update' first)"
                )
            subprocess.run(["dpkg", "-x", str(debs[0]), f"{tmp}/root"], check=True)
            for inside, name in files.items():
                shutil.copyfile(Path(tmp, "root", inside), dest / name)
            print(f"  {package}: {', '.join(files.values())}")


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as wav:
        if wav.getframerate() != SAMPLE_RATE or wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            raise ValueError(f"{path} is not 16 kHz mono 16-bit")
        data = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
    return data.astype(np.float32) / 32768.0


def speech_span(speech: np.ndarray) -> tuple[float, float]:
    """First and last time (s) where the 10 ms RMS level exceeds -35 dBFS: the spoken part
    of a clip, without its leading and trailing pauses. These are the labels' bounds."""
    window = SAMPLE_RATE // 100
    level = np.sqrt(np.convolve(speech**2, np.ones(window) / window, mode="same"))
    loud = np.nonzero(level > 10 ** (-35 / 20))[0]
    return float(loud[0] / SAMPLE_RATE), float(loud[-1] / SAMPLE_RATE)


def build_av_sample(dest: Path, force: bool) -> bool:
    """``walkway_speech.mkv`` and its labels; True when it was (re)built. A file from
    before its packets were stored interleaved (no ``"interleaved"`` in the labels) is
    rebuilt."""
    out_path, labels_path = dest / "walkway_speech.mkv", dest / "walkway_speech.json"
    if (
        not force
        and labels_path.exists()
        and out_path.exists()
        and json.loads(labels_path.read_text()).get("interleaved")
    ):
        print("  walkway_speech.mkv: already here")
        return False
    with av.open(str(dest / "vtest.avi")) as src:
        video_in = src.streams.video[0]
        duration = float(video_in.frames / video_in.average_rate)
        rng = np.random.default_rng(20260101)
        audio = rng.normal(0.0, 10 ** (NOISE_DBFS / 20), int(duration * SAMPLE_RATE)).astype(np.float32)
        labels = []
        for start, name in SPEECH_PLACEMENT:
            speech = read_wav(dest / name)
            begin = int(start * SAMPLE_RATE)
            audio[begin : begin + len(speech)] += speech
            first, last = speech_span(speech)
            labels.append(
                {
                    "start_s": round(start + first, 4),
                    "end_s": round(start + last, 4),
                    "clip_start_s": start,
                    "clip_end_s": round(start + len(speech) / SAMPLE_RATE, 4),
                    "file": name,
                }
            )
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")

        tmp_path = out_path.with_suffix(".tmp.mkv")
        with av.open(str(tmp_path), "w", format="matroska") as out:
            video_out = out.add_stream_from_template(video_in)
            audio_out = out.add_stream("pcm_s16le", rate=SAMPLE_RATE, layout="mono")
            packets = []  # (media time in s, packet, its output stream)
            for packet in src.demux(video_in):
                if packet.dts is None:
                    continue
                if packet.pts is None:
                    packet.pts = packet.dts
                packets.append((float(packet.dts * packet.time_base), packet, video_out))
            step = 1024
            for start in range(0, len(pcm), step):
                frame = av.AudioFrame.from_ndarray(pcm[None, start : start + step], format="s16", layout="mono")
                frame.sample_rate = SAMPLE_RATE
                frame.pts = start
                packets += [(start / SAMPLE_RATE, p, audio_out) for p in audio_out.encode(frame)]
            packets += [(len(pcm) / SAMPLE_RATE, p, audio_out) for p in audio_out.encode(None)]
            # Handed over in time order, the muxer stores them interleaved.
            for _, packet, stream in sorted(packets, key=lambda entry: entry[0]):
                packet.stream = stream
                out.mux(packet)
    tmp_path.replace(out_path)
    labels_path.write_text(
        json.dumps({"speech": labels, "noise_dbfs": NOISE_DBFS, "interleaved": True}, indent=2) + "\n"
    )
    print(f"  walkway_speech.mkv: {duration:.1f} s, speech at " + ", ".join(f"{s:g} s" for s, _ in SPEECH_PLACEMENT))
    return True


def build_late_sample(dest: Path, force: bool) -> None:
    """``walkway_speech_late.mkv``: ``walkway_speech.mkv`` with all its audio stored after
    all its video."""
    out_path = dest / "walkway_speech_late.mkv"
    if not force and out_path.exists():
        print("  walkway_speech_late.mkv: already here")
        return
    tmp_path = remux_audio_late(dest / "walkway_speech.mkv", out_path.with_suffix(".tmp.mkv"), math.inf)
    tmp_path.replace(out_path)
    print(f"  walkway_speech_late.mkv: audio stored up to {max(audio_lag_s(out_path)):.1f} s after its video")


# (kind, seconds, vtest frame to hold still | first vtest frame of real motion)
STILL_MOTION_PLAN = [("still", 20, 0), ("motion", 6, 100), ("still", 25, 300), ("motion", 8, 400),
                     ("still", 15, 560), ("motion", 5, 640), ("still", 10, 700)]  # fmt: skip
STILL_NOISE_SIGMA = 2.5


def write_camera_clip(path: Path, images: Iterable[tuple[np.ndarray, float, float]], rng: np.random.Generator) -> None:
    """Encode ``(rgb float image, gain, offset)`` at 10 fps into ``path`` (MPEG-4 in
    Matroska), each frame as a camera gives it: ``image * gain + offset`` with a little gain
    flicker and fresh sensor noise. Written beside ``path`` first, then moved into place."""
    tmp_path = path.with_suffix(".tmp.mkv")
    with av.open(str(tmp_path), "w", format="matroska") as out:
        stream = None
        for image, gain, offset in images:
            if stream is None:
                stream = out.add_stream("mpeg4", rate=10)
                stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "yuv420p"
                stream.options = {"qscale": "3"}
                stream.codec_context.thread_count = 1
            noisy = image * (gain + rng.normal(0, 0.005)) + offset + rng.normal(0, STILL_NOISE_SIGMA, image.shape)
            frame = av.VideoFrame.from_ndarray(np.clip(noisy, 0, 255).astype(np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        if stream is not None:
            out.mux(stream.encode(None))
    tmp_path.replace(path)


def build_still_motion(dest: Path, force: bool) -> None:
    """``still_motion.mkv``: long still stretches of the real walkway (one real frame held,
    with fresh sensor noise and a little gain flicker on every frame, as a camera gives)
    cut with stretches of the real footage in motion; ``still_motion.json`` lists the
    motion intervals."""
    out_path, labels_path = dest / "still_motion.mkv", dest / "still_motion.json"
    if not force and out_path.exists() and labels_path.exists():
        print("  still_motion.mkv: already here")
        return
    with av.open(str(dest / "vtest.avi")) as src:
        frames = [f.to_ndarray(format="rgb24") for f in src.decode(video=0)]
    labels, t = [], 0.0
    for kind, seconds, _ in STILL_MOTION_PLAN:
        if kind == "motion":
            labels.append({"start_s": t, "end_s": t + seconds})
        t += seconds

    def images() -> Iterator[tuple[np.ndarray, float, float]]:
        for kind, seconds, first in STILL_MOTION_PLAN:
            for i in range(seconds * 10):
                yield (frames[first + i] if kind == "motion" else frames[first]).astype(np.float32), 1.0, 0.0

    write_camera_clip(out_path, images(), np.random.default_rng(20261124))
    labels_path.write_text(json.dumps({"motion": labels, "noise_sigma": STILL_NOISE_SIGMA}, indent=2) + "\n")
    print(f"  still_motion.mkv: {t:.0f} s, motion at " + ", ".join(f"{m['start_s']:g} s" for m in labels))


# Segments of walkway_light.mkv: the walkway held still (people standing) or moving on,
# from where it stopped; and the light of the whole frame changing at known times:
# (start s, seconds, gain, offset, grey) moved to linearly from the light before. Each
# still stretch lasts long enough for the episode of the motion before it to have ended
# when its light changes, so an episode the light opens is seen as one.
LIGHT_PLAN = [("still", 8)] + [("motion", 5), ("still", 20)] * 8 + [("motion", 5), ("still", 8)]
LIGHT_CHANGES = [
    (25.0, 0.5, 1.3, 0.0, 0.0),  # clouds clear in half a second: 30 % brighter
    (50.0, 0.0, 0.6, 0.0, 0.0),  # lights off at once
    (75.0, 3.0, 1.0, 0.0, 0.0),  # auto-exposure brings it back over 3 s
    (82.0, 2.0, 1.25, 0.0, 0.0),  # brighter over 2 s as people walk in (from 83 s)
    (100.0, 0.0, 0.8, 40.0, 1.0),  # the camera switches to infrared: grey, flatter, brighter
    (125.0, 0.5, 1.0, 0.0, 0.0),  # and back to colour
    # Changes too small for a pixel test's whole-frame recalibration (recalibrate_fraction):
    (150.0, 0.0, 1.12, 0.0, 0.0),  # a cloud clears: 12 % brighter at once
    (175.0, 2.0, 0.9, 20.0, 0.0),  # haze over 2 s: flatter, the dark parts lighter
    (200.0, 0.5, 0.8, 12.0, 0.0),  # a cloud passes: darker over half a second
]


def light_at(t: float) -> tuple[float, float, float]:
    """(gain, offset, grey share) of :data:`LIGHT_CHANGES` at media time ``t``."""
    light = (1.0, 0.0, 0.0)
    for start, seconds, *target in LIGHT_CHANGES:
        if t < start:
            break
        share = 1.0 if seconds == 0 else min(1.0, (t - start) / seconds)
        light = tuple(a + (b - a) * share for a, b in zip(light, target, strict=True))  # type: ignore[assignment]
    return light


def build_walkway_light(dest: Path, force: bool) -> None:
    """``walkway_light.mkv``: the real walkway moving and standing still in turns, under
    light that changes at known times (:data:`LIGHT_CHANGES`); ``walkway_light.json`` lists
    the motion intervals, the light changes and the stretches where people stand still."""
    out_path, labels_path = dest / "walkway_light.mkv", dest / "walkway_light.json"
    if not force and out_path.exists() and labels_path.exists():
        print("  walkway_light.mkv: already here")
        return
    with av.open(str(dest / "vtest.avi")) as src:
        frames = [f.to_ndarray(format="rgb24") for f in src.decode(video=0)]
    motion, standing, t = [], [], 0.0
    for kind, seconds in LIGHT_PLAN:
        (motion if kind == "motion" else standing).append({"start_s": t, "end_s": t + seconds})
        t += seconds

    def images() -> Iterator[tuple[np.ndarray, float, float]]:
        index, start = 0, 0.0
        for kind, seconds in LIGHT_PLAN:
            for i in range(seconds * 10):
                if kind == "motion":
                    index += 1
                image = frames[index].astype(np.float32)
                gain, offset, grey = light_at(start + i / 10)
                yield image * (1 - grey) + image.mean(axis=2, keepdims=True) * grey, gain, offset
            start += seconds

    write_camera_clip(out_path, images(), np.random.default_rng(20261201))
    light = [{"start_s": start, "end_s": start + seconds} for start, seconds, *_ in LIGHT_CHANGES]
    labels_path.write_text(json.dumps({"motion": motion, "light": light, "standing": standing}, indent=2) + "\n")
    print(f"  walkway_light.mkv: {t:.0f} s, {len(motion)} stretches of motion, {len(light)} light changes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=default_dest())
    parser.add_argument("--force", action="store_true", help="download and build again")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    print(f"sample media in {args.dest}:")
    fetch_packages(args.dest, args.force)
    rebuilt = build_av_sample(args.dest, args.force)
    build_late_sample(args.dest, args.force or rebuilt)
    build_still_motion(args.dest, args.force)
    build_walkway_light(args.dest, args.force)


if __name__ == "__main__":
    main()

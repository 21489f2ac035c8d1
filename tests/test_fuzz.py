"""Bad input, generated: config files, MQTT command payloads and media. Each must give a
clear error (a ConfigError / CommandError, or one line from the CLI) or be skipped and
counted — never another exception, never a hang."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from stream_rt import Config, ConfigError, load_config, parse_config
from stream_rt.policies.control import EpisodeControls, SourceControl
from stream_rt.sinks.commands import CommandError, apply_command


def config_keys(model: type[BaseModel] = Config) -> list[str]:
    """Every field name of the config, at any depth (the fuzz mixes real keys and bogus ones)."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(name)
        for inner in getattr(field.annotation, "__args__", (field.annotation,)):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                keys += config_keys(inner)
    return sorted(set(keys))


KEYS = st.sampled_from([*config_keys(), "bogus", "Sources", "url "])
LEAVES = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True), st.text(max_size=30),
    st.sampled_from(["synthetic:?frames=5", "mqtt://h/t", "mqtt://", "cam.mkv", "latest", "block", "smoke", "-1"]),
)  # fmt: skip
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=5)),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_any_config_dict_is_accepted_or_refused_with_a_config_error(data: dict[str, Any]) -> None:
    try:
        parse_config(data)
    except ConfigError as exc:
        assert str(exc) and all(line.startswith("config: ") for line in str(exc).splitlines())


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_config_file_is_accepted_or_refused_with_a_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.toml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_config(path)
        except ConfigError as exc:
            assert str(exc).startswith(str(path))


PAYLOADS = st.one_of(
    st.binary(max_size=6000),
    st.text(max_size=200).map(str.encode),
    st.dictionaries(st.sampled_from(["on", "off", "question", "x"]), LEAVES, max_size=3).map(
        lambda d: __import__("json").dumps(d, allow_nan=True).encode()
    ),
)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(["enabled", "trigger", "ask", "zoom", "", "set"]), PAYLOADS)
def test_any_command_payload_is_applied_or_refused_with_a_command_error(feature: str, payload: bytes) -> None:
    trigger = SourceControl(EpisodeControls())
    try:
        done = apply_command(trigger, {"gate"}, "gate", feature, payload)
    except CommandError as exc:
        assert "\n" not in str(exc)
        return
    assert done["applied"]


@pytest.fixture(scope="module")
def clip_bytes(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The first 3 s of the real walkway clip with its speech, as Matroska (cut once)."""
    out = tmp_path_factory.mktemp("clip") / "short.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(samples / "walkway_speech.mkv"), "-t", "3", "-c", "copy",
                    str(out)], check=True)  # fmt: skip
    return out.read_bytes()


def replay(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_rt.cli", "replay", str(path), "--out", str(path.with_suffix(".jsonl"))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("damage", ["flip", "cut", "zero_run", "shuffle", "header"])
def test_damaged_real_media_replays_what_it_can_or_says_why_in_one_line(
    clip_bytes: bytes, tmp_path: Path, damage: str
) -> None:
    data = bytearray(clip_bytes)
    rng = random.Random(damage)
    if damage == "flip":
        for _ in range(200):
            data[rng.randrange(200, len(data))] ^= 1 << rng.randrange(8)
    elif damage == "cut":
        data = data[: len(data) * 2 // 3]
    elif damage == "zero_run":
        start = rng.randrange(len(data) // 4, len(data) // 2)
        data[start : start + 20_000] = bytes(20_000)
    elif damage == "shuffle":
        blocks = [data[i : i + 4096] for i in range(4096, len(data), 4096)]
        rng.shuffle(blocks)
        data = data[:4096] + b"".join(blocks)
    else:
        data[:64] = bytes(rng.randrange(256) for _ in range(64))
    path = tmp_path / f"{damage}.mkv"
    path.write_bytes(bytes(data))
    done = replay(path)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("stream-rt:")]
        assert done.returncode == 2 and len(errors) == 1 and f"'{path}'" in errors[0], done.stderr[-2000:]
        assert errors[0].count(str(path)) == 1, "the file is named once"


def write_segment(path: Path, size: tuple[int, int], rate: int, layout: str, seconds: float) -> None:
    with av.open(str(path), "w", format="mpegts") as out:
        video = out.add_stream("mpeg2video", rate=25)
        video.width, video.height, video.pix_fmt = *size, "yuv420p"
        audio = out.add_stream("mp2", rate=rate)
        audio.layout = layout
        channels = 2 if layout == "stereo" else 1
        for i in range(int(seconds * 25)):
            y = np.full((size[1], size[0], 3), (i * 7) % 255, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(y, format="rgb24")):
                out.mux(packet)
        samples = (0.2 * np.sin(np.arange(int(seconds * rate)) / 9)).astype(np.float32)
        for start in range(0, len(samples) - 1152, 1152):
            chunk = np.tile(samples[start : start + 1152], (channels, 1)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate = rate
            for packet in audio.encode(frame):
                out.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode():
                out.mux(packet)


def test_a_stream_whose_resolution_and_audio_format_change_midway_replays_to_the_end(tmp_path: Path) -> None:
    first, second = tmp_path / "a.ts", tmp_path / "b.ts"
    write_segment(first, (320, 240), 44_100, "stereo", 3.0)
    write_segment(second, (640, 360), 22_050, "mono", 3.0)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    done = replay(joined)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    total = re.search(r"total: (\d+) frames, (\d+) audio chunks, ([\d.]+) s of media", done.stderr)
    assert total is not None, done.stderr
    frames, chunks, seconds = int(total[1]), int(total[2]), float(total[3])
    assert frames >= 140 and seconds >= 5.9, "both halves were decoded"
    assert chunks >= 150, "and the sound of both"

"""Shared fixtures: the real sample recordings, generated media, free ports."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_rt.testing import StreamServer
from stream_rt.testing import free_port as free_port_now

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = Path(os.environ.get("STREAM_RT_SAMPLES", ROOT / "samples"))


@pytest.fixture(scope="session")
def samples() -> Path:
    """The real recordings fetched by scripts/fetch_samples.py (CI fetches them first)."""
    needed = (
        "vtest.avi",
        "tree.avi",
        "pen.mov",
        "walkway_speech.mkv",
        "walkway_speech_late.mkv",
        "still_motion.mkv",
        "walkway_light.mkv",
    )
    if not all((SAMPLES / name).exists() for name in needed):
        pytest.fail(f"sample media missing in {SAMPLES}: run 'python scripts/fetch_samples.py'", pytrace=False)
    return SAMPLES


@pytest.fixture(scope="session")
def ffmpeg() -> str:
    path = shutil.which("ffmpeg")
    if path is None:
        pytest.fail("ffmpeg is not installed: 'apt-get install ffmpeg' (.ci/run does this)", pytrace=False)
    return path


@pytest.fixture
def free_port() -> int:
    return free_port_now()


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture
def server(ffmpeg: str, samples: Path, free_port: int) -> Iterator[StreamServer]:
    """A live camera: ffmpeg looping the real walkway clip over TCP on ``free_port``."""
    srv = StreamServer(ffmpeg, samples / "vtest.avi", free_port)
    srv.start()
    yield srv
    srv.kill()

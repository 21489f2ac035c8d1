"""Live cameras for tests and benchmarks, on loopback ports: ``ffmpeg`` streaming a clip
(:class:`StreamServer`, :class:`LaggingAvServer`) and GStreamer's RTSP server
(:class:`RtspCamera`, running :mod:`stream_rt.testing.rtsp_camera` with the system Python,
which has ``python3-gi``)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from stream_rt.testing.media import remux_audio_late
from stream_rt.testing.ports import wait_listening


class StreamServer:
    """A real ``ffmpeg -re`` looping a clip (video only) as MPEG-TS on a loopback TCP port
    (``tcp://127.0.0.1:PORT``, one client at a time): a live camera that tests can kill,
    pause and start again."""

    def __init__(self, ffmpeg: str, clip: Path, port: int) -> None:
        self.cmd = [
            ffmpeg, "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip),
            "-an", "-c:v", "mpeg4", "-q:v", "6", "-f", "mpegts", f"tcp://127.0.0.1:{port}?listen=1",
        ]  # fmt: skip
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL)
        wait_listening(self.port, self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def pause(self) -> None:
        """The connection stays open but nothing more is sent."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)


class RtspCamera(StreamServer):
    """A real RTSP server (GStreamer's, run by :data:`SCRIPT` with the system Python, which
    has ``python3-gi``) on a loopback port: ``/video`` (H.264) and ``/av`` (H.264 + AAC),
    live at 10 fps. Tests kill it and start it again on the same port. Benchmarks run
    :data:`SCRIPT` themselves for its other mounts (``--scene``, ``--file``; see its
    docstring)."""

    SCRIPT = Path(__file__).with_name("rtsp_camera.py")

    def __init__(self, port: int, python: str = "/usr/bin/python3") -> None:
        self.cmd = [python, str(self.SCRIPT), str(port)]
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, mount: str = "video") -> str:
        return f"rtsp://127.0.0.1:{self.port}/{mount}"


class LaggingAvServer(StreamServer):
    """A real ``ffmpeg -re`` serving a cut of a clip with audio as MPEG-TS on a loopback TCP
    port (``tcp://127.0.0.1:PORT``; one client, once, no loop), whose audio reaches the
    client ``audio_late_s`` seconds (wall time) after the video of the same media time
    (0: together), as from a camera whose audio path is slower than its video.

    The cut (``duration_s`` from ``start_s``) is encoded once to MPEG-4 video and 16 kHz
    mono MP2 audio (codecs MPEG-TS carries) and remuxed with its audio stored
    ``audio_late_s`` behind its video (:func:`remux_audio_late`). ``-re`` reads it at the
    pace of its latest timestamp, so each audio packet leaves when the video ``audio_late_s``
    later does; ``-c copy`` sends the packets as read: ``-max_interleave_delta 1`` (µs)
    keeps the muxer from interleaving them again by dts, ``-omit_video_pes_length 0`` lets
    the client's demuxer hand over a video frame as soon as it is complete instead of at the
    next one, and ``-bsf:v dump_extra`` repeats the MPEG-4 headers, which Matroska kept out
    of band, in the stream. The first second and the last ``audio_late_s`` of media time
    arrive less skewed (the client's probe, the end of the video)."""

    def __init__(
        self,
        ffmpeg: str,
        clip: Path,
        workdir: Path,
        port: int,
        audio_late_s: float,
        *,
        start_s: float = 0.0,
        duration_s: float = 5.0,
    ) -> None:
        cut, served = workdir / f"cut_{port}.mkv", workdir / f"served_{port}.mkv"
        subprocess.run(
            [ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-ss", f"{start_s}", "-t", f"{duration_s}",
             "-i", str(clip), "-c:v", "mpeg4", "-q:v", "6", "-c:a", "mp2", "-ar", "16000", "-ac", "1", str(cut)],
            check=True,
        )  # fmt: skip
        remux_audio_late(cut, served, audio_late_s)
        self.cmd = [
            ffmpeg, "-hide_banner", "-loglevel", "error", "-re", "-i", str(served), "-c", "copy",
            "-bsf:v", "dump_extra", "-max_interleave_delta", "1", "-omit_video_pes_length", "0",
            "-f", "mpegts", f"tcp://127.0.0.1:{port}?listen=1",
        ]  # fmt: skip
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

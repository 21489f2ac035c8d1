"""Test media: clips whose audio is stored late in the file, as some recorders write them,
and the measure of how late; frames of a recording with the sound between them."""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt


def remux_audio_late(src: Path, dst: Path, late_s: float) -> Path:
    """Copy the packets of ``src`` (its first video and first audio stream; nothing is
    re-encoded, every timestamp stays) into the Matroska file ``dst``, storing each audio
    packet right after the video packets up to its pts + ``late_s`` seconds: in file order
    its audio lies ``late_s`` behind its video (:func:`audio_lag_s` measures it). With
    ``late_s=math.inf`` all audio follows all video, but for the last video packet, which
    the muxer keeps until the audio reaches its time. Returns ``dst``.

    FFmpeg's muxer interleaves packets again by dts, buffering up to
    ``max_interleave_delta`` (10 s by default). With a delta of 1 µs it writes them in the
    order given, except that it holds back the last packet until the next one comes and
    writes an audio packet with an earlier dts before it; so each audio packet is handed
    over after the first video packet beyond its place, which the muxer then writes after
    it."""
    with (
        av.open(str(src)) as inp,
        av.open(str(dst), "w", format="matroska", options={"max_interleave_delta": "1"}) as out,
    ):
        streams = [inp.streams.video[0], inp.streams.audio[0]]
        outs = {s.index: out.add_stream_from_template(s) for s in streams}
        handed = []  # (time in s to hand the packet over at, audio?, packet)
        previous_video_s = -math.inf
        for packet in inp.demux(streams):
            if packet.dts is None:
                continue  # the demuxer's end-of-stream marker
            if packet.stream.type == "video":
                handed.append((previous_video_s, False, packet))
                previous_video_s = float(packet.dts * packet.time_base)
            else:
                pts = packet.pts if packet.pts is not None else packet.dts
                handed.append((float(pts * packet.time_base) + late_s, True, packet))
        for _, _, packet in sorted(handed, key=lambda entry: entry[:2]):
            packet.stream = outs[packet.stream.index]
            out.mux(packet)
    return dst


def audio_lag_s(path: Path) -> list[float]:
    """For each audio packet of ``path``, in file order: how far (media seconds) the last
    video packet stored before it is ahead of it (negative: behind; an audio packet
    before any video is left out). About one packet's duration for an interleaved file."""
    lags, video_s = [], None
    with av.open(str(path)) as container:
        for packet in container.demux():
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is None:
                continue
            if packet.stream.type == "video":
                video_s = float(pts * packet.time_base)
            elif packet.stream.type == "audio" and video_s is not None:
                lags.append(video_s - float(pts * packet.time_base))
    return lags


def clip_with_sound(
    path: Path, start_s: float, frames: int, step_s: float = 0.5
) -> tuple[list[npt.NDArray[np.uint8]], list[int], npt.NDArray[np.float32]]:
    """``frames`` RGB frames of the recording at ``path`` from ``start_s``, ``step_s``
    apart, their times (ns), and its sound (16 kHz mono) from the first to the last: a
    clip as the model stage asks about one."""
    images: list[npt.NDArray[np.uint8]] = []
    pts: list[int] = []
    with av.open(str(path)) as container:
        for picture in container.decode(video=0):
            if picture.time is not None and picture.time >= start_s + len(images) * step_s:
                images.append(np.asarray(picture.to_ndarray(format="rgb24"), np.uint8))
                pts.append(int(picture.time * 1e9))
                if len(images) == frames:
                    break
    pieces, first = [], None
    resampler = av.AudioResampler(format="flt", layout="mono", rate=16_000)
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                first = out.time if first is None else first
                pieces.append(out.to_ndarray()[0])
    if first is None:
        raise ValueError(f"{path} has no audio")
    begin = round((pts[0] / 1e9 - first) * 16_000)
    sound = np.concatenate(pieces)[begin : begin + round((pts[-1] - pts[0]) / 1e9 * 16_000)]
    return images, pts, sound.astype(np.float32)

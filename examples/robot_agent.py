#!/usr/bin/env python3
"""A robot agent: the robot's own control loop pushes camera frames into stream_rt and
gets actions back through a callback.

The perception gates decide when the view changed enough to ask the model; token reuse
makes repeated questions about a mostly unchanged view cheap, and decoding stops the
moment the JSON answer is complete (early exit). The robot loop here replays a recording
at its real frame rate in its own thread, as a camera driver would deliver frames.

    python examples/robot_agent.py [VIDEO] [--model smoke|MODEL_DIR] [--seconds N]

With the smoke model (the default: no download) the actions are not meaningful.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from pathlib import Path

import av

from stream_rt import CallbackSink, MllmAnswer, PushSource, build_pipeline, parse_config

HERE = Path(__file__).resolve().parent


def robot_camera_loop(source: PushSource, video: Path, seconds: float, speed: float, stop: threading.Event) -> None:
    """Stands in for the robot's driver loop: one RGB frame at a time, at ``speed`` x real time."""
    started = time.monotonic()
    with av.open(str(video)) as container:
        for frame in container.decode(video=0):
            if stop.is_set() or frame.time is None or frame.time > seconds:
                break
            delay = frame.time / speed - (time.monotonic() - started)
            if delay > 0:
                time.sleep(delay)
            source.push(frame.to_ndarray(format="rgb24"), pts_ns=int(frame.time * 1e9))
    source.close()


def act(answer: MllmAnswer) -> None:
    """The robot's side: turn an answer into an action (here: print it)."""
    action = (answer.answer or {}).get("action") if answer.status == "ok" else None
    reused = answer.tokens.get("visual_reused", 0)
    visual = answer.tokens.get("visual", 0)
    print(f"t={answer.pts_ns / 1e9:5.1f} s  {answer.status:7s} action={action!r}  "
          f"visual tokens reused {reused} of {visual}  stop={answer.stop or '-'}", flush=True)  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", nargs="?", type=Path, default=HERE.parent / "samples" / "still_motion.mkv")
    parser.add_argument("--model", default="smoke")
    parser.add_argument("--seconds", type=float, default=40.0, help="stop after this much of the video")
    parser.add_argument("--speed", type=float, default=1.0, help="the camera's pace: 1 = real time")
    args = parser.parse_args()
    config = parse_config({
        "trigger": {"update_interval_s": 4, "cooldown_s": 1, "max_calls_per_min": 30},
        "mllm": {
            "model": args.model, "question": "What should the robot do next?", "flow": "latest",
            "contract_stop": True, "reuse_threshold": 0.02, "max_image_side": 512, "crop_regions": False,
            "token_reuse": {"enabled": True},
        },
    })  # fmt: skip
    camera = PushSource("robot_cam")
    pipeline = build_pipeline(config, sources=[camera])
    pipeline.graph.add(CallbackSink("actions", act))
    pipeline.graph.connect("mllm.answers", "actions.in", capacity=16)
    stop = threading.Event()
    loop_args = (camera, args.video, args.seconds, args.speed, stop)
    driver = threading.Thread(target=robot_camera_loop, args=loop_args, daemon=True)
    driver.start()
    try:
        await pipeline.graph.run()
    finally:
        stop.set()
        driver.join()


if __name__ == "__main__":
    asyncio.run(main())

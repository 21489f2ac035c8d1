#!/usr/bin/env python3
"""Publish a recording's frames as JPEG messages on an MQTT topic, at its own pace — what
a robot or a camera bridge does when it feeds stream_rt over MQTT.

    python examples/publish_frames.py VIDEO --topic site/cam1/frames [--host H] [--port P] [--speed 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import av
import paho.mqtt.client as mqtt

from stream_rt.media.images import rgb_to_jpeg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", type=Path)
    parser.add_argument("--topic", default="site/cam1/frames")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--speed", type=float, default=1.0, help="1 = real time")
    args = parser.parse_args()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect(args.host, args.port)
    client.loop_start()
    started, sent = time.monotonic(), 0
    with av.open(str(args.video)) as container:
        for frame in container.decode(video=0):
            if frame.time is None:
                continue
            delay = frame.time / args.speed - (time.monotonic() - started)
            if delay > 0:
                time.sleep(delay)
            client.publish(args.topic, rgb_to_jpeg(frame.to_ndarray(format="rgb24"), quality=4), qos=0)
            sent += 1
    client.loop_stop()
    client.disconnect()
    print(f"published {sent} frames on {args.topic}")


if __name__ == "__main__":
    main()

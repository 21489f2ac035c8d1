"""Live latency, camera to broker: a real RTSP camera on loopback (GStreamer's RTSP
server, H.264 at 10 fps, 640x360) shows a still grey picture in which a ball appears
and moves for ``--on-s`` seconds every ``--on-s + --off-s``; the camera says the wall-clock
time at which the first frame showing each appearance was captured. ``stream-rt run``
(the default gates, the smoke model in-process) watches it and publishes to a real
mosquitto, and a subscriber notes when each message arrives.

Measured per appearance: capture -> the episode's ``new`` event on the broker (target: p95
<= ``confirm_s`` + 150 ms); beside it, in the same run, capture -> the first decoded frame
showing it in a bare PyAV client of the same mount (what the camera and its RTSP server
take before any client can see the change), so the daemon's own share is the difference;
and event -> its answer on the broker (the smoke model on
these 2 cores: its answers are not meaningful, its time is a real model call's). An
appearance with no ``new`` event while it lasts is missed; a ``new`` event outside every
appearance is false. The first appearance is included (the daemon has watched the still
picture for ``--off-s`` seconds before it). The last line is one JSON object.

    python benchmarks/latency.py [--changes 12] [--on-s 3] [--off-s 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from stream_rt.testing import Broker, RtspCamera, free_port

ROOT = Path(__file__).resolve().parents[1]


CAMERA = RtspCamera.SCRIPT
CONFIRM_S = 0.1  # the default [trigger] confirm_s
CUTOFF_S = 3.0  # and cutoff_s


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile, interpolated between the nearest values (with 12 values the p95
    lies between the largest two)."""
    if len(values) < 2:
        return round(values[0], 3) if values else None
    return round(statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1], 3)


def bare_client(url: str, seen: list[float]) -> None:
    """Decode ``url`` as any client would; note when each appearance is first seen."""
    import av

    shown = False
    with av.open(url, options={"rtsp_transport": "tcp"}, timeout=10) as container:
        for frame in container.decode(video=0):
            now = time.time()
            white = bool((frame.to_ndarray(format="gray")[::4, ::4] > 200).any())
            if white and not shown:
                seen.append(now)
            shown = white


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=12, help="appearances to measure")
    parser.add_argument("--on-s", type=float, default=3.0)
    parser.add_argument("--off-s", type=float, default=5.0)
    args = parser.parse_args()
    if args.off_s <= CUTOFF_S + CONFIRM_S:
        parser.error(f"--off-s must exceed the default cutoff_s + confirm_s ({CUTOFF_S + CONFIRM_S} s), or the "
                     "episode never ends between appearances")  # fmt: skip
    arrivals: list[tuple[float, str, dict[str, object]]] = []
    changes: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(free_port(), Path(tmp))
        broker.start()
        camera_port = free_port()
        camera = subprocess.Popen(["/usr/bin/python3", str(CAMERA), str(camera_port), "--scene",
                                   str(args.on_s), str(args.off_s)], stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert camera.stdout is not None and camera.stdout.readline().strip() == "ready"

        def read_camera() -> None:
            assert camera.stdout is not None
            for line in camera.stdout:
                what, at = line.split()
                changes.append((what, float(at)))

        threading.Thread(target=read_camera, daemon=True).start()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="latency-benchmark")
        client.on_connect = lambda c, *_: c.subscribe("stream_rt/#", qos=1)
        client.on_message = lambda c, u, m: arrivals.append(
            (time.time(), m.topic, json.loads(m.payload) if m.payload.startswith(b"{") else {})
        )
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        config = Path(tmp) / "latency.toml"
        config.write_text(
            f'[[sources]]\nid = "scene"\nurl = "rtsp://127.0.0.1:{camera_port}/scene"\naudio = false\n\n'
            f'[mllm]\nmodel = "smoke"\n\n[sinks.mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
            f'outbox = "{tmp}/outbox.sqlite"\n'
        )
        daemon = subprocess.Popen([sys.executable, "-m", "stream_rt.cli", "run", str(config), "--log-level", "warning"],
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        while not any(t.endswith("/scene/status") and m.get("state") == "online" for _, t, m in arrivals):
            time.sleep(0.1)  # the daemon watches before the first appearance (the schedule starts now)
        seen: list[float] = []
        threading.Thread(target=bare_client, args=(f"rtsp://127.0.0.1:{camera_port}/scene", seen), daemon=True).start()
        period = args.on_s + args.off_s
        deadline = time.time() + 60 + args.changes * period
        print(f"measuring {args.changes} appearances ({args.changes * period:.0f} s) ...", file=sys.stderr)
        while time.time() < deadline and sum(what == "appeared" for what, _ in changes) <= args.changes:
            time.sleep(0.5)
        time.sleep(3)  # the last answers
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        camera.kill()
        client.loop_stop()
        broker.kill()
    appeared = [(at, at + args.on_s) for what, at in changes if what == "appeared"]
    news = [(at, m) for at, topic, m in arrivals if topic.endswith("/events") and m.get("type") == "new"]
    false = sum(not any(start - 0.05 <= at <= end + 1.0 for start, end in appeared) for at, _ in news)
    appeared = appeared[: args.changes]
    seen_at = [next((at for at in seen if start - 0.05 <= at <= end), None) for start, end in appeared]
    answers = {m.get("event_id"): at for at, topic, m in arrivals if topic.endswith("/answers")}
    bare = [at - start for at, (start, _) in zip(seen_at, appeared, strict=True) if at is not None]
    onsets, made, over_bare, missed = [], [], [], []
    for index, ((start, end), client) in enumerate(zip(appeared, seen_at, strict=True)):
        first = next(((at, m) for at, m in news if start - 0.05 <= at <= end), None)
        if first is None:
            missed.append(index)
        else:
            onsets.append(first[0] - start)
            made.append(int(first[1]["wall_ns"]) / 1e9 - start)  # type: ignore[call-overload]
            if client is not None:  # (the bare client connects after the daemon and may miss the first)
                over_bare.append(first[0] - client)
    to_answer = [answers[m["event_id"]] - at for at, m in news if m.get("event_id") in answers]
    result = {
        "appearances": len(appeared), "missed": len(missed), "missed_which": missed, "false_new_events": false,
        "capture_to_event_p50_s": percentile(onsets, 0.5), "capture_to_event_p95_s": percentile(onsets, 0.95),
        "capture_to_event_max_s": round(max(onsets), 3) if onsets else None,
        "capture_to_event_made_p50_s": percentile(made, 0.5),
        "capture_to_bare_client_p50_s": percentile(bare, 0.5), "capture_to_bare_client_p95_s": percentile(bare, 0.95),
        "bare_client_saw": len(bare),
        "daemon_over_bare_client_p95_s": percentile(over_bare, 0.95),
        "target_p95_s": CONFIRM_S + 0.15,
        "event_to_answer_p50_s": percentile(to_answer, 0.5), "event_to_answer_p95_s": percentile(to_answer, 0.95),
        "event_to_answer_max_s": round(max(to_answer), 3) if to_answer else None,
        "answers": len(to_answer),
    }  # fmt: skip
    if onsets:
        print(f"capture -> event on the broker: p50 {statistics.median(onsets) * 1000:.0f} ms, "
              f"p95 {result['capture_to_event_p95_s']} s over {len(onsets)} appearances ({len(missed)} missed, "
              f"{false} false); a bare PyAV client saw each appearance after p50 "
              f"{result['capture_to_bare_client_p50_s']} s", file=sys.stderr)  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()

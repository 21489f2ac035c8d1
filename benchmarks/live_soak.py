#!/usr/bin/env python3
"""Live soak: the camera daemon as it is deployed, at real-time pace, for hours.

Four RTSP cameras on loopback (GStreamer's RTSP server, one process each, serving real
clips transcoded to H.264 and looped by stream copy into files longer than the run) feed
one ``stream-rt run`` daemon (a child process, the smoke model, clips with audio-free
compression off, a standing watch re-checked every 30 s on one camera, the JSONL sink, the
MQTT sink to a real mosquitto with a durable outbox, ``/healthz`` and ``/metrics``). A
real subscriber (paho-mqtt, persistent QoS 1 session) records everything under the prefix
and asks one camera a question every minute (``<source>/ask/set``), cameras in turn.

Half-way the broker is killed and started again without persistence (retained states
gone: the daemon must publish them again); at 60 % one camera goes away for 60 s. Every
minute the daemon's RSS, open descriptors and threads are read from ``/proc``. At the end
the daemon gets SIGTERM and must exit within 10 s, leaving ``offline`` retained.

Figures (last line, one JSON object; series in ``benchmarks/series/live_soak.csv``):
growth of RSS, descriptors and threads from after the warm-up (the first fifth) to the end
(medians of the tenth after warm-up and of the last tenth); events in the JSONL vs event
ids received on ``<source>/events`` (lost = in the JSONL, never received); asks
acknowledged vs answered; seconds to exit after SIGTERM; the retained availability.

Usage: python benchmarks/live_soak.py [--minutes 120]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from stream_rt.testing import Broker, RtspCamera, Subscriber, free_port

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
CLIPS = ["vtest.avi", "walkway_light.mkv", "still_motion.mkv", "walkway_speech.mkv"]
SERIES = Path(__file__).resolve().parent / "series" / "live_soak.csv"


def say(message: str) -> None:
    print(f"live_soak [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def looped_h264(clip: Path, seconds: float, out: Path) -> Path:
    """``clip`` as 384x288 H.264 at 10 fps (a key frame a second), repeated by stream copy
    until it lasts ``seconds``."""
    once = out.with_suffix(".once.mp4")
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-i", str(clip), "-an", "-vf", "scale=384:288,fps=10", "-c:v", "libx264",
         "-preset", "ultrafast", "-tune", "zerolatency", "-g", "10", "-pix_fmt", "yuv420p", str(once)],
        check=True,
    )  # fmt: skip
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-stream_loop", "-1", "-i", str(once), "-t", str(seconds), "-c", "copy",
         str(out)],
        check=True,
    )  # fmt: skip
    return out


def start_camera(port: int, clip: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["/usr/bin/python3", str(RtspCamera.SCRIPT), str(port), "--file", str(clip), "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the RTSP camera on port {port} did not start")
    return proc


def proc_sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    field = {line.split(":")[0]: line.split(":")[1].split() for line in status if ":" in line}
    return {
        "rss_mb": int(field["VmRSS"][0]) / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(field["Threads"][0]),
    }


def growth(series: list[float]) -> dict[str, float]:
    n = len(series)
    warm, tenth = n // 5, max(1, n // 10)
    after, end = statistics.median(series[warm : warm + tenth]), statistics.median(series[-tenth:])
    return {"after_warmup": after, "end": end, "growth": round(end / after - 1, 4) if after else 0.0}


def write_config(path: Path, cameras: list[int], broker: int, ops: int, workdir: Path) -> None:
    sources = "".join(
        f'[[sources]]\nid = "cam{i}"\nurl = "rtsp://127.0.0.1:{port}/file0"\naudio = false\n'
        "stall_timeout_s = 5\ntimeout_s = 5\n\n"
        for i, port in enumerate(cameras)
    )
    path.write_text(
        sources
        + '[[watches]]\nid = "people"\nsource = "cam0"\ncondition = "a person is walking"\nrecheck_s = 30\n\n'
        + '[graph]\ndrain_timeout_s = 5\nvideo_channel = { policy = "latest", capacity = 1 }\n\n'
        + '[mllm]\nmodel = "smoke"\nflow = "latest"\ntimeout_s = 60\n'
        + "[mllm.clip]\nframes = 3\ninterval_s = 1.0\n"
        + "[mllm.memory]\nenabled = true\nmax_entries = 16\n\n"
        + f'[sinks.jsonl]\npath = "{workdir / "events.jsonl"}"\n\n'
        + f'[sinks.mqtt]\nhost = "127.0.0.1"\nport = {broker}\nprefix = "stream_rt"\n'
        + f'outbox = "{workdir / "outbox.sqlite"}"\n\n'
        + f'[ops]\nhttp = "127.0.0.1:{ops}"\n\n[logging]\nlevel = "info"\n'
    )


async def healthy(port: int, daemon: subprocess.Popen[bytes], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited with {daemon.returncode} while starting")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(1)
    raise RuntimeError(f"/healthz did not answer 200 within {within_s:.0f} s")


def publish(port: int, topic: str, payload: str) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-asker-{time.monotonic_ns()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


async def soak(minutes: float, workdir: Path) -> dict[str, Any]:
    seconds = minutes * 60
    say(f"preparing {len(CLIPS)} looped H.264 clips of {seconds + 300:.0f} s")
    clips = [looped_h264(SAMPLES / name, seconds + 300, workdir / f"cam{i}.mp4") for i, name in enumerate(CLIPS)]
    broker_port, ops_port = free_port(), free_port()
    camera_ports = [free_port() for _ in clips]
    broker = Broker(broker_port, workdir)
    broker.start()
    cameras = [start_camera(port, clip) for port, clip in zip(camera_ports, clips, strict=True)]
    subscriber = Subscriber(broker_port)
    await asyncio.wait_for(subscriber.connected.wait(), 10)
    config = workdir / "soak.toml"
    write_config(config, camera_ports, broker_port, ops_port, workdir)
    log = (workdir / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "stream_rt.cli", "run", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=workdir
    )
    say(f"daemon {daemon.pid} started; waiting for /healthz to say every camera is online")
    rows: list[dict[str, float]] = []
    asked: list[str] = []
    broker_restarted = False
    outage_until: float | None = None
    minute = 0
    try:
        await healthy(ops_port, daemon, 120)
        say(f"healthy; {minutes:g} min at live pace (workdir {workdir})")
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited with {daemon.returncode}: see {workdir / 'daemon.log'}")
            if elapsed >= minute * 60:
                rows.append({"minute": minute, **proc_sample(daemon.pid)})
                source = f"cam{minute % len(cameras)}"
                publish(broker_port, f"stream_rt/{source}/ask/set", json.dumps({"question": f"minute {minute}?"}))
                asked.append(source)
                say(f"minute {minute}: {rows[-1]}")
                minute += 1
            if not broker_restarted and elapsed >= seconds / 2:
                say("broker killed; started again in 5 s, without persistence")
                broker.kill()
                await asyncio.sleep(5)
                broker.start()
                broker_restarted = True
            if outage_until is None and elapsed >= seconds * 0.6:
                say("camera cam1 goes away for 60 s")
                cameras[1].kill()
                cameras[1].wait()
                outage_until = elapsed + 60
            if outage_until is not None and cameras[1].poll() is not None and elapsed >= outage_until:
                cameras[1] = start_camera(camera_ports[1], clips[1])
                say("camera cam1 is back")
            await asyncio.sleep(1)
        say("SIGTERM")
        stop = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        exit_s = time.monotonic() - stop
        await asyncio.sleep(2)  # the last messages reach the subscriber
    finally:
        if daemon.poll() is None:
            daemon.kill()
        for camera in cameras:
            camera.kill()
        await subscriber.close()
        broker.kill()
        log.close()

    SERIES.parent.mkdir(parents=True, exist_ok=True)
    with SERIES.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    records = [json.loads(line) for line in (workdir / "events.jsonl").read_text().splitlines()]
    logged = {r["event_id"] for r in records if r["kind"] == "Event"}
    received = {str(p["event_id"]) for p in subscriber.payloads("/events")}
    acks = [p for p in subscriber.payloads("/status") if "event_id" in p and "applied" in p]
    answered = {str(p["event_id"]) for p in subscriber.payloads("/answers")}
    available = [p for t, p, _ in subscriber.messages if t == "stream_rt/available"]
    return {
        "minutes": minutes,
        "cameras": len(cameras),
        "rss_mb": growth([r["rss_mb"] for r in rows]),
        "fds": growth([r["fds"] for r in rows]),
        "threads": growth([r["threads"] for r in rows]),
        "events_logged": len(logged),
        "events_lost": len(logged - received),
        "asks_sent": len(asked),
        "asks_acknowledged": len(acks),
        "asks_answered": sum(1 for a in acks if str(a["event_id"]) in answered),
        "exit_after_sigterm_s": round(exit_s, 2),
        "exit_code": daemon.returncode,
        "available_last": available[-1].decode() if available else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=120.0)
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs, JSONL, outbox)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="stream-rt-soak-"))
    figures = asyncio.run(soak(args.minutes, workdir))
    if not args.keep:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

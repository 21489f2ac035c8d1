#!/usr/bin/env bash
# Prepare a fresh machine for stream_rt: system packages, a virtual environment in .venv
# (torch first, from the CPU wheel), the package with its dev tools at the versions in
# requirements.lock, and the sample media.
# Safe to run again: each step skips what is already there, and a .venv whose packages
# moved away from the lock is brought back to it.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# command:package; mosquitto_sub/_pub (mosquitto-clients): the README's MQTT examples;
# chromium: the tests render the HTML report headless; promtool: they lint /metrics
for pair in ffmpeg:ffmpeg mosquitto:mosquitto mosquitto_sub:mosquitto-clients chromium:chromium promtool:prometheus; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
# GStreamer's RTSP server for the tests' RTSP camera, run by the system python3 with python3-gi
/usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0')" 2>/dev/null ||
  need+=(python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
         gstreamer1.0-plugins-ugly gstreamer1.0-libav)
/usr/bin/python3 -c "import gi; gi.require_version('Gst', '1.0'); from gi.repository import Gst; Gst.init(None);
assert Gst.ElementFactory.find('x264enc') and Gst.ElementFactory.find('avenc_aac')" 2>/dev/null ||
  need+=(gstreamer1.0-plugins-ugly gstreamer1.0-libav)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${need[*]}: install them with 'sudo apt-get install ${need[*]}' and run again" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
# torch before anything that depends on it, pinned, so pip never pulls a CUDA build
# (scripts/relock.py reads this pin too).
torch_pin=torch==2.13.0
have=$(.venv/bin/python -c "from importlib.metadata import version; print(version('torch'))" 2>/dev/null || true)
if [ "${have%%+*}" != "${torch_pin#torch==}" ]; then
  echo "setup: installing $torch_pin"
  .venv/bin/pip install -q "$torch_pin"
fi
# Every other package at the version in requirements.lock (made by scripts/relock.py; the
# extras and the package itself come from pyproject.toml). pip moves any package that
# differs from the lock to the locked version.
echo "setup: installing stream-rt with speech detection and transcription, the object gate and its dev tools (requirements.lock)"
.venv/bin/pip install -q -c requirements.lock -e ".[dev,vad,speech,mllm,memory,detect]"

.venv/bin/python scripts/fetch_samples.py

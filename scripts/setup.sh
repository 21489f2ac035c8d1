#!/usr/bin/env bash
# Prepare a fresh machine for stream_rt: system packages, a virtual environment in .venv
# (torch first, from the CPU wheel), the package with its dev tools, and the sample media.
# Safe to run again: each step skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# command:package; chromium: the tests render the HTML report headless; promtool: they lint /metrics
for pair in ffmpeg:ffmpeg mosquitto:mosquitto chromium:chromium promtool:prometheus; do
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
# torch before anything that depends on it, pinned, so pip never pulls a CUDA build.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0"
  .venv/bin/pip install -q torch==2.13.0
fi
echo "setup: installing stream-rt with speech detection, the object gate and its dev tools"
.venv/bin/pip install -q -e ".[dev,vad,mllm,memory,detect]"

.venv/bin/python scripts/fetch_samples.py

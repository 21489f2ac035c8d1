#!/usr/bin/env bash
# Download, here, the wheels benchmarks/gpu.sh installs on a GPU machine that has python3
# 3.12 with torch but no internet: what stream_rt needs beyond that machine's packages, at
# the versions this checkout is tested with (about 50 MB, in .wheels-gpu/).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .wheels-gpu
python=${PYTHON:-.venv/bin/python}
for spec in av==18.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  aiomqtt==2.5.1 paho-mqtt==2.2.0 pytest-asyncio==1.5.0 transformers==5.24.0; do
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .wheels-gpu "$spec"
done
ls .wheels-gpu

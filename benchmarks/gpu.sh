#!/usr/bin/env bash
# The GPU check: one script, under 8 minutes on one H200 machine (16 cores, no internet):
# its parts are cut off at 120 + 120 + 240 s.
#
#   1. Each technique's CUDA path against full computation: tests/test_call_path.py on the
#      GPU (float32, so "equal" means logits within 1e-4 and the same greedy tokens): the
#      layer loop vs transformers' own forward (a prompt, after a prefix, a decoded token),
#      and all 16 combinations of token reuse, clip + compression, memory prefix and layer
#      exit with nothing reused; then all of them reusing together on a still view.
#   2. benchmarks/compose.py in bfloat16 on the GPU, SmolVLM-256M shaped and Qwen2-VL-2B
#      shaped (random weights): the encode / prefill / decode split, token reuse end to end
#      per episode of 2 calls (the cache-filling call included), compression and the memory
#      prefix, each combination against full computation, on the static camera and the film.
#
# What it needs there: python3 with torch (CUDA) and the packages the machine does not
# have, as wheels in .wheels-gpu/ (scripts/gpu_wheels.sh downloads them here), and the two
# sample clips. With the device tool:
#   run(command="bash benchmarks/gpu.sh", carry=[".wheels-gpu", "samples/still_motion.mkv",
#       "samples/Megamind.avi"])
# Each part's output and the JSON figures go to $OUT (default /tmp/stream_rt_gpu).
# QUICK=1 runs the same steps on the tiny models (a check of the script itself, on CPU too).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/stream_rt_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD
# What the machine's python lacks (or has at another version) comes from the carried wheels.
if ! $PY -c "import av, pydantic, aiomqtt, transformers; assert transformers.__version__.startswith('5.24')" \
  2>/dev/null; then
  [ -d .wheels-gpu ] || { echo "gpu.sh: packages missing and no .wheels-gpu/ (scripts/gpu_wheels.sh)"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .wheels-gpu/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
device=cuda
dtype=bfloat16
if [ "${QUICK:-0}" = 1 ]; then
  echo "gpu.sh: QUICK=1 — a check of the script on the tiny models: its timings mean nothing"
  sizes=(tiny tiny)
  $PY -c "import torch; raise SystemExit(0 if torch.cuda.is_available() else 1)" || { device=cpu; dtype=float32; }
else
  sizes=(realistic 2b)
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" |
  tee -a "$OUT/gpu.txt"
started=$(date +%s)
failed=0

echo "== 1. CUDA paths against full computation ($device, float32)"
STREAM_RT_TEST_DEVICE=$device timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_call_path.py 2>&1 |
  tee "$OUT/equality.txt" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

echo "== 2. compose.py, $dtype on $device"
families=(idefics3 qwen2_vl)
for i in 0 1; do
  family=${families[$i]} size=${sizes[$i]}
  limit=$([ "$size" = 2b ] && echo 240 || echo 120)  # 2b: building the model (~4.4 GB) comes first
  timeout $limit $PY benchmarks/compose.py --family "$family" --size "$size" --device "$device" --dtype "$dtype" \
    --calls 2 > "$OUT/compose_${family}.txt" 2>&1
  rc=$?
  tail -1 "$OUT/compose_${family}.txt" > "$OUT/compose_${family}.json"
  [ $rc -eq 0 ] || { failed=1; tail -5 "$OUT/compose_${family}.txt"; }
  $PY - "$OUT/compose_${family}.json" <<'EOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
for clip, s in r["clips"].items():
    print(f"{r['family']} {r['size']} {clip}: full {s['full']['episode_s']} s per episode, split "
          f"{s['full']['encode_prefill_decode_s']}; " + "; ".join(
              f"{k} {v['speedup_per_episode']}x top1 {v['top1']}" for k, v in s.items() if k != "full"))
EOF
done
echo "== done in $(( $(date +%s) - started )) s, failed=$failed; files in $OUT"
exit $failed

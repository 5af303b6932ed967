#!/usr/bin/env bash
# One device call for the models issue on one GPU: tests/gpu (what one GPU can run), then
# `moeray bench generate` on the Mixtral-shaped preset (random weights written on the device) with
# the per-phase breakdown and transformers' generate as the peer. Results land in $OUT.
# Needs the packed Ray in .device/ (../shared/device/pack-ray .device).
# usage: scripts/generate_device_run.sh
set -o pipefail
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
source .device/activate
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, ray, transformers; print('torch', torch.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
[ "${SKIP_TESTS:-0}" = 1 ] || timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/gpu ${TEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout ${BENCH_TIMEOUT:-330} python3 -m moeray.cli bench generate --preset mixtral-4l --phases ${BENCH_ARGS:---hf} \
  --json "$OUT/generate.json" 2>&1 | grep -v "Loading weights" | tee "$OUT/generate.log"
echo "==== summary"; tail -1 "$OUT/gpu_tests.log" 2>/dev/null; grep "^B=\|^transformers" "$OUT/generate.log"

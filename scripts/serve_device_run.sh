#!/usr/bin/env bash
# One device call for the serving issue on one GPU: tests/gpu, then `moeray bench serve` on the
# Mixtral-shaped preset (random weights written on the device, the tiny tokenizer added) with 16
# and 64 concurrent streaming clients through Ray Serve's HTTP proxy. Results land in $OUT.
# Needs the packed Ray (with Serve's web stack) in .device/: see docs/benchmarks/serve.md.
# usage: scripts/serve_device_run.sh
set -o pipefail
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
source .device/activate
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, ray, fastapi, uvicorn; print('torch', torch.__version__, 'ray', ray.__version__, 'fastapi', fastapi.__version__)" | tee -a "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"
[ "${SKIP_TESTS:-0}" = 1 ] || timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/gpu ${TEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
for clients in ${CLIENTS:-16 64}; do
  timeout ${BENCH_TIMEOUT:-170} python3 -m moeray.cli bench serve --device cuda --preset mixtral-4l --workers 1 \
    --clients "$clients" --prompt-tokens 128 --max-tokens 128 --duration-s ${DURATION_S:-45} --machine "1x H200" \
    --date "$(date +%F)" --json "$OUT/serve-h200-c$clients.json" 2>&1 | grep -v "INFO\|Loading weights" | tail -8 \
    | tee "$OUT/serve-c$clients.log"
done
echo "==== summary"; tail -1 "$OUT/gpu_tests.log" 2>/dev/null; cat "$OUT"/serve-c*.log | grep -A1 "^requests"

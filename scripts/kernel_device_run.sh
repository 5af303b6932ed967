#!/usr/bin/env bash
# One device call for the expert kernels: GPU tests, then the benchmark (optionally with the
# Triton tile sweep). Results land in $OUT (the device tool brings them back).
# usage: scripts/kernel_device_run.sh [extra args for moeray.bench.kernel, e.g. --sweep]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kernel_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -x tests/gpu/test_kernels_gpu.py -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
python3 -m moeray.bench.kernel --date 2026-11-22 --json "$OUT/kernel.json" "$@" 2>&1 | tee "$OUT/bench.log"

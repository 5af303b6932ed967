#!/usr/bin/env bash
# One device call for issue 12 on one GPU: tests/gpu (shard widths included) and the CUDA part of
# the device batch split's tests, the shard kernel timing, then the cost model's GPU bench.
# Results in "$OUT/". Needs .device (../shared/device/pack-ray .device) and .device/traces (see
# scripts/device_cost_bench.sh).
set -o pipefail
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
OUT=${OUT:-/tmp/issue12_out}; mkdir -p "$OUT"
source .device/activate
export PYTHONPATH=$PWD:$PYTHONPATH
echo "${COMMIT:-$(git rev-parse HEAD 2>/dev/null)}" | tee "$OUT/commit.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/unit/test_device_batch_split.py \
  tests/unit/test_sharded_dispatch.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout 90 python3 scripts/shard_kernel_timing.py --out "$OUT/shard-kernel-h200.json" > "$OUT/shard_kernel.log" 2>&1
tail -3 "$OUT/shard_kernel.log"
timeout 230 bash scripts/device_cost_bench.sh 2>&1 | tail -25
echo "==== tests"; tail -1 "$OUT/gpu_tests.log"

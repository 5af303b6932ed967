#!/usr/bin/env bash
# The cost model's GPU part on one GPU (docs/benchmarks/cost-model.md): kernel calibration and
# held-out launches (Triton), and the committed 2 x H200 exchange table's held-out sizes.
# Results land in "$OUT/" (the device tool brings them back): cost-model-gpu.json, cost.log, gpu.txt.
#
# The real-trace batches need the OLMoE trace, which does not travel by itself (../shared is not
# sent); before the device call, here:
#   mkdir -p .device/traces && cp ../shared/traces/olmoe_mixtral_domain_expert_counts.json .device/traces/
# and carry .device (it is carried anyway for `activate`). Without it the trace cases are skipped.
#
# usage: scripts/device_cost_bench.sh [extra args for moeray.bench.cost, e.g. --quick]
# env:   DATE (default 2026-12-02), TRACES (default .device/traces)
set -o pipefail
source .device/activate
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/cost_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
traces=${TRACES:-.device/traces}
extra=()
[ -f "$traces/olmoe_mixtral_domain_expert_counts.json" ] && extra+=(--traces "$traces")
python3 -m moeray.bench.cost --device cuda --date "${DATE:-2026-12-02}" --machine "1 x $gpu" \
  --out "$OUT/cost-model-gpu.json" "${extra[@]}" "$@" 2>&1 | tee "$OUT/cost.log"

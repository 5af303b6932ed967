#!/usr/bin/env bash
# One device call for the GPU data path (2 GPUs): exchange and layer benchmarks, then tests/gpu.
# Results land in $OUT (the device tool brings them back). Needs the packed Ray in .device/
# (../shared/device/pack-ray .device) and the DeepSeek trace copied to .device/traces/.
# usage: scripts/gpu_device_run.sh
set -o pipefail
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
source .device/activate
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
nvidia-smi topo -m 2>&1 | head -5 | tee -a "$OUT/gpu.txt"
python3 -c "import torch, ray; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version(), 'ray', ray.__version__)" | tee -a "$OUT/gpu.txt"
[ "${SKIP_EXCHANGE:-0}" = 1 ] || timeout 150 python3 -m moeray.cli bench exchange --date 2026-11-22 --json "$OUT/exchange.json" 2>&1 | tee "$OUT/exchange.log"
timeout 200 python3 -m moeray.cli bench layer --traces .device/traces --date 2026-11-22 --json "$OUT/layer.json" ${LAYER_ARGS:-} 2>&1 | tee "$OUT/layer.log"
timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_comm_gpu.py tests/gpu/test_engine_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | grep -v "^$" | tail -30
echo "==== summary"
grep -h "verdict\|mean\|all layers" "$OUT"/exchange.log "$OUT"/layer.log 2>/dev/null
tail -1 "$OUT/gpu_tests.log"

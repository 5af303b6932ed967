#!/usr/bin/env bash
# One device call for issue 13 on one GPU: the ceilings (scripts/tier_probe.py), the host-tier GPU
# tests, `moeray bench tier` for the shapes in $SHAPES (default olmoe), then the rest of tests/gpu
# when $ALL_GPU_TESTS is set. Results in "$OUT/". Needs .device (../shared/device/pack-ray .device)
# and .device/traces/olmoe_mixtral_domain_expert_counts.json (a copy of ../shared/traces, ignored).
set -o pipefail
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
OUT=${OUT:-/tmp/issue13_out}; mkdir -p "$OUT"
source .device/activate
export PYTHONPATH=$PWD:$PYTHONPATH
echo "${COMMIT:-$(git rev-parse HEAD 2>/dev/null)}" | tee "$OUT/commit.txt"
lscpu | grep -E "Model name|^CPU\(s\)" | tee "$OUT/cpu.txt"; grep -o "amx[a-z_0-9]*\|avx512_bf16" /proc/cpuinfo | sort -u | tr "\n" " " | tee -a "$OUT/cpu.txt"; echo
timeout 60 python3 scripts/tier_probe.py "$OUT/ceilings.json" | tail -20
[ -n "$SKIP_TESTS" ] || timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_host_tier_gpu.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/tier_tests.log" | tail -8
timeout ${BENCH_S:-300} python3 -m moeray.cli bench tier --shapes ${SHAPES:-olmoe} --traces .device/traces ${BENCH_ARGS:-} \
  --json "$OUT/tier-h200-${SHAPES//,/-}.json" > "$OUT/bench.log" 2>&1
grep -E "rates|ours_over_all" "$OUT/bench.log" | tail -30
if [ -n "$ALL_GPU_TESTS" ]; then
  timeout ${TESTS_S:-200} python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -6
fi

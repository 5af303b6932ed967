#!/usr/bin/env bash
# One device call for issue 13 on one GPU: the ceilings (scripts/tier_probe.py; not with $SKIP_PROBE), the host-tier GPU
# tests, `moeray bench tier` for the shapes in $SHAPES (default olmoe) with $BENCH_ARGS, then, when
# $BENCH2_ARGS is set, the same bench again on the same lease with those arguments added (e.g.
# "--launch thread": a same-lease comparison), then the rest of tests/gpu when $ALL_GPU_TESTS is
# set. Each bench gets a fresh Triton cache (TRITON_CACHE_DIR), so neither finds the other's
# kernels compiled. Results in "$OUT/" (the device tool returns at most 8 files: keep it so).
# Needs .device (../shared/device/pack-ray .device) and
# .device/traces/olmoe_mixtral_domain_expert_counts.json (a copy of ../shared/traces, ignored).
# The device copy's git is stale: pass COMMIT=<the commit of the tree> to record it.
set -o pipefail
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
OUT=${OUT:-/tmp/issue13_out}; mkdir -p "$OUT"
source .device/activate
export PYTHONPATH=$PWD:$PYTHONPATH
{ echo "commit ${COMMIT:-unknown}"; lscpu | grep -E "Model name|^CPU\(s\)"
  grep -o "amx[a-z_0-9]*\|avx512_bf16" /proc/cpuinfo | sort -u | tr "\n" " "; echo; } | tee "$OUT/lease.txt"
[ -n "$SKIP_PROBE" ] || timeout 60 python3 scripts/tier_probe.py "$OUT/ceilings.json" | tail -20
[ -n "$SKIP_TESTS" ] || timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_host_tier_gpu.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/tier_tests.log" | tail -8
bench() {  # bench NAME EXTRA_ARGS...
  local name=$1; shift
  TRITON_CACHE_DIR=$(mktemp -d) timeout ${BENCH_S:-300} python3 -m moeray.cli bench tier --shapes ${SHAPES:-olmoe} \
    --traces .device/traces ${BENCH_ARGS:-} "$@" --json "$OUT/$name.json" >> "$OUT/bench.log" 2>&1
  grep -E "rates|beats" "$OUT/bench.log" | tail -30 | cut -c1-400
}
bench "tier-h200-${SHAPES//,/-}"
[ -z "$BENCH2_ARGS" ] || bench "tier-h200-${SHAPES//,/-}-2" $BENCH2_ARGS
if [ -n "$ALL_GPU_TESTS" ]; then
  timeout ${TESTS_S:-200} python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -6
fi

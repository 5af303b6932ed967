"""Where the time of a host-tier layer step goes (issue 13), on the device machine: the layer path
of `moeray bench tier` (OLMoE shape by default) with fixed routing, timed per layer step for the
cold paths fetch / host / auto at several torch CPU thread counts, then one profiled run of auto
(torch.profiler: CPU spans and the GPU's copies and kernels on one clock), summarised per layer
step: when the host math starts and ends, when the weight copies run, and how fast they move while
the host math runs against while it does not (the DMA and the CPU read one host memory).

    python scripts/tier_timeline.py --traces DIR [--shape olmoe] [--budget 32] [--tokens 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from moeray.bench.tier import SHAPES, Stack, random_layer_weights, routed, sync
from moeray.host_tier import ColdPath, HostSlots
from moeray.tier_counts import TierCounts
from moeray.tier_launch import LaunchThread
from moeray.tier_measure import measure_rates
from placement.traces import load_olmoe_mixtral


def layer_steps_ms(stack: Stack, steps, x_TD, reps: int = 1) -> list[float]:
    """Wall time of every layer step (CUDA synchronised around each)."""
    out = []
    with torch.no_grad():
        for _ in range(reps):
            for ids_LTK, weights_LTK in steps:
                for layer, experts in enumerate(stack.layers):
                    sync(stack.cuda)
                    t0 = time.perf_counter()
                    experts(x_TD, ids_LTK[layer], weights_LTK[layer])
                    sync(stack.cuda)
                    out.append(1e3 * (time.perf_counter() - t0))
    return out


def set_path(stack: Stack, mode: str, rates) -> None:
    for experts in stack.layers:
        experts.host.path = ColdPath(mode, rates if mode == "auto" else None, stack.fetch_slots,
                                     host_margin=stack.host_margin)


def summarise_trace(trace: dict) -> list[dict]:
    """Per profiled layer step ("layer_step" spans): host math span, weight copies (H2D of >= 1 MiB)
    in and out of it, and the other copies."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    steps = sorted((e for e in events if e.get("name") == "layer_step" and e.get("cat") == "user_annotation"),
                   key=lambda e: e["ts"])
    maths = [e for e in events if e.get("name") == "host_math" and e.get("cat") == "user_annotation"]
    copies = [e for e in events if e.get("cat") == "gpu_memcpy"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    rows = []
    for step in steps:
        lo, hi = step["ts"], step["ts"] + step["dur"]
        mine = [c for c in copies if lo <= c["ts"] < hi]
        math = [m for m in maths if lo <= m["ts"] < hi]
        # the host math runs in chunks between fetch rounds: its span, first chunk to last
        m_lo, m_hi = (min(m["ts"] for m in math), max(m["ts"] + m["dur"] for m in math)) if math else (hi, hi)
        big = [c for c in mine if c.get("args", {}).get("bytes", 0) >= 1 << 20 and "HtoD" in c["name"]]
        small = [c for c in mine if c not in big]

        def rate(cs, inside: bool):
            sel = [c for c in cs if (m_lo <= c["ts"] + c["dur"] / 2 < m_hi) == inside]
            b, t = sum(c["args"].get("bytes", 0) for c in sel), sum(c["dur"] for c in sel)
            return len(sel), (b / t / 1e3 if t else None)  # GB/s

        n_in, gbps_in = rate(big, True)
        n_out, gbps_out = rate(big, False)
        my_kernels = [k for k in kernels if lo <= k["ts"] < hi]
        rows.append(dict(
            step_ms=step["dur"] / 1e3,
            host_math_start_ms=(m_lo - lo) / 1e3, host_math_span_ms=(m_hi - m_lo) / 1e3,
            host_math_ms=sum(m["dur"] for m in math) / 1e3, host_math_chunks=len(math),
            weight_copies=len(big), first_copy_ms=((min(c["ts"] for c in big) - lo) / 1e3) if big else None,
            last_copy_end_ms=((max(c["ts"] + c["dur"] for c in big) - lo) / 1e3) if big else None,
            copy_busy_ms=sum(c["dur"] for c in big) / 1e3,
            copies_during_math=n_in, GBps_during_math=gbps_in, copies_outside_math=n_out, GBps_outside_math=gbps_out,
            small_copies=[(c["name"][:20], round((c["ts"] - lo) / 1e3, 3), round(c["dur"] / 1e3, 3)) for c in small],
            kernels=len(my_kernels), last_kernel_end_ms=((max(k["ts"] + k["dur"] for k in my_kernels) - lo) / 1e3)
            if my_kernels else None))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--traces", required=True)
    p.add_argument("--shape", default="olmoe")
    p.add_argument("--budget", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", default="16,15,12,8")
    p.add_argument("--launch", default="inline,thread:0.005,thread:1e-4,thread:2e-5",
                   help="launch variants timed for host and auto: inline | thread[:switch interval s]")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--small", action="store_true", help="shapes / 16 on the CPU (a smoke run of the script)")
    args = p.parse_args()
    shape = SHAPES[args.shape]
    D, F, E, K = shape["hidden"], shape["ffn"], shape["experts"], shape["top_k"]
    if args.small:
        D, F = D // 16, F // 16
    trace = load_olmoe_mixtral(args.traces, shape["trace_model"])
    probs = {d: w / w.sum(axis=1, keepdims=True) for d, w in trace.workloads.items()}
    domain = sorted(probs)[0]
    device = torch.device("cpu" if args.small else "cuda")
    w13, w2 = random_layer_weights(trace.shape[0], E, D, F, device, seed=0)
    rates = measure_rates(D, F, torch.bfloat16, device)
    stack = Stack(w13, w2, args.budget, rates, 4, device)
    rng = np.random.default_rng(0)
    steps = [routed(probs[domain], args.tokens, K, rng, device) for _ in range(args.steps)]
    x_TD = (torch.randn(args.tokens, D) * 0.1).to(torch.bfloat16).to(device)
    result = {"shape": args.shape, "budget": args.budget, "tokens": args.tokens, "rates": vars(rates), "timings": []}
    print("rates", rates, flush=True)
    def timed(mode: str, **row) -> None:
        set_path(stack, mode, rates)
        layer_steps_ms(stack, steps[:2], x_TD)  # warm
        for h in (e.host for e in stack.layers):
            h.counts = TierCounts()
        ms = layer_steps_ms(stack, steps, x_TD, reps=2)
        counts = [e.host.counts for e in stack.layers]
        n = max(1, sum(c.steps for c in counts))
        row.update(mode=mode, median_layer_step_ms=float(np.median(ms)),
                   host_experts=sum(c.host_experts for c in counts) / n,
                   fetched_experts=sum(c.fetched_experts for c in counts) / n,
                   host_ms=1e3 * sum(c.host_s for c in counts) / n)
        result["timings"].append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for mode in ("fetch", "host", "auto"):
            timed(mode, threads=threads)
    # how the launches run beside the host math: inline, or on the launch thread at a switch interval
    torch.set_num_threads(int(args.threads.split(",")[0]))
    pool, default_launch = stack.pool, (stack.pool.threaded, LaunchThread.SWITCH_INTERVAL_S)
    for variant in [v for v in args.launch.split(",") if v]:
        how, _, interval = variant.partition(":")
        pool.threaded = how == "thread" and stack.cuda.type == "cuda"
        if pool.threaded:
            pool.launch_thread().switch_interval_s = float(interval) if interval else LaunchThread.SWITCH_INTERVAL_S
        for mode in ("host", "auto"):
            timed(mode, threads=torch.get_num_threads(), launch=variant)
    pool.threaded = default_launch[0]
    if pool.threaded:
        pool.launch_thread().switch_interval_s = default_launch[1]

    # the profiled run: auto at the first thread count, host math and layer steps marked
    torch.set_num_threads(int(args.threads.split(",")[0]))
    set_path(stack, "auto", rates)
    original = HostSlots._host_math

    def marked(self, *a, **kw):
        with torch.profiler.record_function("host_math"):
            return original(self, *a, **kw)

    HostSlots._host_math = marked
    from torch.profiler import ProfilerActivity, profile

    try:
        layer_steps_ms(stack, steps[:2], x_TD)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with torch.no_grad():
                for ids_LTK, weights_LTK in steps[:3]:
                    for layer, experts in enumerate(stack.layers):
                        sync(stack.cuda)
                        with torch.profiler.record_function("layer_step"):
                            experts(x_TD, ids_LTK[layer], weights_LTK[layer])
                            sync(stack.cuda)
    finally:
        HostSlots._host_math = original
    path = os.path.join(args.out, "timeline.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        result["profiled_auto"] = summarise_trace(json.load(f))
    for row in result["profiled_auto"]:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "small_copies"})
        print("   small copies (name, start ms, ms):", row["small_copies"][:12])
    with open(os.path.join(args.out, "timeline_summary.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

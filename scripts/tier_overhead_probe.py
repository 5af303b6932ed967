"""Why auto's steps run longer than fetch's where auto fetches nearly everything (issue 13), on the
device machine: the layer stack of `moeray bench tier` at one configuration (OLMoE, budget 32,
decode 8, stationary by default), its modes run in turn twice (so neither order nor warm-up
decides), each step's wall time kept; the CPU time spent in the auto path's planning pieces
(HostSlots._plan, LayerSpan.begin / end, the split trial) summed by wrapping them; then one
torch.profiler run of each mode's steady steps, the top CPU operators written out.

    python scripts/tier_overhead_probe.py --traces DIR [--out DIR] [--modes fetch_live,ours_no_prefetch,...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import numpy as np
import torch

from moeray.bench import tier as bench
from moeray.host_tier import HostSlots
from moeray.tier_calibration import LayerSpan, SplitTrial
from moeray.tier_measure import measure_rates
from placement.traces import load_olmoe_mixtral

SPENT = defaultdict(float)
CALLS = defaultdict(int)


def timed(owner, name: str, label: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - t0
            CALLS[label] += 1

    setattr(owner, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    p.add_argument("--out", default=".")
    p.add_argument("--budget", type=int, default=32)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--steps", type=int, default=48)
    p.set_defaults(modes="fetch_live,ours_no_prefetch,ours_trial")
    args = p.parse_args()
    shape = bench.SHAPES["olmoe"]
    trace = load_olmoe_mixtral(args.traces, shape["trace_model"])
    probs = {d: w / w.sum(axis=1, keepdims=True) for d, w in trace.workloads.items()}
    domains = [d for d in args.domains.split(",") if d in probs]
    D, F, E, K = shape["hidden"], shape["ffn"], shape["experts"], shape["top_k"]
    if args.small:
        D, F = D // 16, F // 16
    device = torch.device(args.device)
    w13, w2 = bench.random_layer_weights(trace.shape[0], E, D, F, device, args.seed)
    rates = measure_rates(D, F, torch.bfloat16, device)
    stack = bench.Stack(w13, w2, args.budget, rates, args.fetch_slots, device, args.host_margin, args.launch,
                        args.switch_interval)
    identity = np.tile(np.arange(E), (trace.shape[0], 1))
    bench.warm_up(stack, identity, probs, domains, args.tokens, K, args, rates)  # the bench's
    for owner, name, label in ((HostSlots, "_plan", "plan"), (HostSlots, "compute", "compute"),
                               (LayerSpan, "begin", "span.begin"), (LayerSpan, "end", "span.end"),
                               (SplitTrial, "play_split", "trial.play"), (SplitTrial, "observe", "trial.observe"),
                               (HostSlots, "_host_part", "host_part"), (HostSlots, "_send_rows", "send_rows")):
        timed(owner, name, label)
    schedule = bench.domain_schedule(probs, domains, args.steps, False)
    runs = []
    for round_ in range(2):
        for mode in args.modes.split(","):
            SPENT.clear()
            CALLS.clear()
            out = bench.run_config(stack, mode, identity, schedule, probs, args.tokens, K, args, rates)
            row = dict(mode=mode, round=round_, tokens_per_s=out["tokens_per_s"], median_step_ms=out["median_step_ms"],
                       second_half_tokens_per_s=out["second_half_tokens_per_s"], step_ms=out["step_ms"],
                       swaps=out.get("swaps"), overruled=out.get("overruled_per_layer_step"),
                       host_experts=out.get("host_experts_per_layer_step"),
                       fetched_experts=out.get("fetched_experts_per_layer_step"),
                       trial=out.get("split_trial"), modelled_path=out.get("modelled_path"),
                       cpu_ms={k: round(1e3 * v, 3) for k, v in SPENT.items()}, calls=dict(CALLS))
            runs.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "step_ms"}), flush=True)
    tables = {}
    from torch.profiler import ProfilerActivity, profile

    for mode in args.modes.split(","):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            bench.run_config(stack, mode, identity, schedule[:16], probs, args.tokens, K, args, rates)
        tables[mode] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        print(mode, "\n", tables[mode][:4000], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tier-overhead.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "args": vars(args), "runs": runs}, f, indent=1)
    with open(os.path.join(args.out, "tier-overhead-profiles.txt"), "w") as f:
        for mode, table in tables.items():
            f.write(f"== {mode}\n{table}\n")


if __name__ == "__main__":
    main()

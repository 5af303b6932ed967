"""`python -m placement.bench`: placement quality of static / EPLB / ours on real and synthetic traces
(`--fault-aware`: only the fault-aware option's figures, placement.bench_fault).

Shapes:
    L  MoE layers    E  logical experts    S  slots    T  tokens per batch    K  top-k

For each trace x workers (8, 16, 32, 64) x redundant slots (0, E/8, E/4; rounded up so every
worker has the same slot count): imbalance (mean and worst layer, averaged over workloads) of
static contiguous, EPLB global, EPLB hierarchical (8 workers per node) and ours; slots and bytes
moved on drift (plan on workload i, re-plan on workload i+1) and under 1% multiplicative noise;
planning time. Then the dispatch split (per-step imbalance), the hierarchical cost model, and the
per-batch figures (placement.bench_batch: predicted step times of six layouts, with the cost model
checked against the measured kernel and exchange benches).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from placement.bench_batch import bench_per_batch, cost_model_check, format_cost_check, format_per_batch
from placement.dispatch import mod_split, replica_weights_by_expert, split_to_slots, step_imbalance
from placement.eplb import default_num_groups, eplb_placement, static_placement
from placement.hierarchy import ClusterCostModel, hierarchical_pays
from placement.layout import Topology, migration_between
from placement.metrics import imbalance
from placement.planner import plan
from placement.traces import SyntheticConfig, Trace, measure, noisy, real_traces, sample_batch_ids, synthetic_trace

DEEPSEEK_EXPERT_BYTES = 3 * 7168 * 2048  # gate/up/down projections at fp8: 44 MB per expert
WORKERS_PER_NODE = 8


def topology_for(num_experts: int, workers: int, redundant: int) -> Topology:
    slots_per_worker = -(-(num_experts + redundant) // workers)
    nodes = max(1, workers // WORKERS_PER_NODE)
    return Topology(nodes, workers // nodes, slots_per_worker)


def eplb_hier(load_LE: np.ndarray, topo: Topology):
    groups = default_num_groups(load_LE.shape[1], topo.num_nodes)
    return eplb_placement(load_LE, topo, hierarchical=True, num_groups=groups)


def bench_config(trace: Trace, workers: int, redundant: int, bytes_per_expert: int, seed: int) -> dict:
    names = list(trace.workloads)
    num_layers, num_experts = trace.shape
    topo = topology_for(num_experts, workers, redundant)
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("static", "eplb_global", "eplb_hier", "ours")}
    violations, ours_ms, eplb_ms, replan_ms, noise_ms = 0, [], [], [], []
    drift = {"ours_copies": 0, "eplb_copies": 0, "ours_imb": [], "eplb_imb": []}
    noise = {"ours_copies": 0, "eplb_copies": 0, "slots": 0}
    static = static_placement(num_layers, num_experts, topo)
    fitted = {}
    for name in names:
        load = trace.workloads[name]
        t0 = time.perf_counter()
        eg = eplb_placement(load, topo)
        eplb_ms.append((time.perf_counter() - t0) * 1e3)
        ours = plan(load, topo, bytes_per_expert=bytes_per_expert)
        ours_ms.append(ours.planning_ms)
        fitted[name] = (eg, ours)
        imbs = {
            "static": imbalance(load, static),
            "eplb_global": imbalance(load, eg),
            "eplb_hier": imbalance(load, eplb_hier(load, topo)),
            "ours": ours.predicted_imbalance_LAYERS,
        }
        for key, imb in imbs.items():
            rows[key].append((float(imb.mean()), float(imb.max())))
        ok = imbs["ours"].mean() <= imbs["eplb_global"].mean() + 1e-12 and imbs["ours"].max() <= imbs[
            "eplb_global"
        ].max() * 1.01
        violations += not ok
        # 1% multiplicative noise on the same workload
        jitter = noisy(load, 0.01, rng)
        again = plan(jitter, topo, current=ours.placement, bytes_per_expert=bytes_per_expert)
        noise_ms.append(again.planning_ms)
        noise["ours_copies"] += again.migration.num_copies
        noise["eplb_copies"] += migration_between(eg, eplb_placement(jitter, topo), topo).num_copies
        noise["slots"] += num_layers * topo.num_slots
    for i, name in enumerate(names if len(names) > 1 else []):
        nxt = names[(i + 1) % len(names)]
        load_b = trace.workloads[nxt]
        eg_a, ours_a = fitted[name]
        eg_b, _ = fitted[nxt]
        replanned = plan(load_b, topo, current=ours_a.placement, bytes_per_expert=bytes_per_expert)
        replan_ms.append(replanned.planning_ms)
        drift["ours_copies"] += replanned.migration.num_copies
        drift["eplb_copies"] += migration_between(eg_a, eg_b, topo).num_copies
        drift["ours_imb"].append(float(replanned.predicted_imbalance_LAYERS.mean()))
        drift["eplb_imb"].append(float(imbalance(load_b, eg_b).mean()))
    summary = {key: [float(np.mean([m for m, _ in v])), float(np.mean([w for _, w in v]))] for key, v in rows.items()}
    return {
        "trace": trace.name,
        "workers": workers,
        "slots": topo.num_slots,
        "redundant": topo.num_slots - num_experts,
        "imbalance_mean_worst": summary,
        "workloads_where_ours_misses_eplb": violations,
        "drift": {
            "pairs": len(drift["ours_imb"]),
            "ours_slots_moved": drift["ours_copies"],
            "eplb_slots_moved": drift["eplb_copies"],
            "ours_bytes": drift["ours_copies"] * bytes_per_expert,
            "eplb_bytes": drift["eplb_copies"] * bytes_per_expert,
            "ours_over_eplb_bytes": drift["ours_copies"] / max(drift["eplb_copies"], 1),
            "ours_imbalance": float(np.mean(drift["ours_imb"])) if drift["ours_imb"] else None,
            "eplb_imbalance": float(np.mean(drift["eplb_imb"])) if drift["eplb_imb"] else None,
        },
        "noise1pct": {
            "ours_slot_fraction": noise["ours_copies"] / noise["slots"],
            "eplb_slot_fraction": noise["eplb_copies"] / noise["slots"],
        },
        "ms": {
            "ours_fresh_median": float(np.median(ours_ms)),
            "ours_replan_median": float(np.median(replan_ms)) if replan_ms else None,
            "ours_noise_replan_median": float(np.median(noise_ms)),
            "eplb_median": float(np.median(eplb_ms)),
        },
    }


def bench_dispatch(trace: Trace, workers: int, redundant: int, steps: int, tokens: int, seed: int) -> dict:
    """Per-step imbalance of the weighted split vs `position mod replicas` (multinomial batches)."""
    load = next(iter(trace.workloads.values()))
    topo = topology_for(load.shape[1], workers, redundant)
    result = plan(load, topo)
    log2phy = result.placement.log2phy
    weights_LER = replica_weights_by_expert(result.replica_weights, log2phy)
    rng = np.random.default_rng(seed)
    ours, baseline = [], []
    for _ in range(steps):
        for layer in range(load.shape[0]):
            ids = sample_batch_ids(load[layer], tokens, trace.top_k, rng)
            ours.append(step_imbalance(split_to_slots(ids, log2phy[layer], weights_LER[layer]), topo.num_slots, topo.slots_per_worker))
            baseline.append(step_imbalance(mod_split(ids, log2phy[layer]), topo.num_slots, topo.slots_per_worker))
    return {
        "trace": trace.name,
        "workers": workers,
        "slots": topo.num_slots,
        "tokens_per_step": tokens,
        "weighted_split": float(np.mean(ours)),
        "mod_split": float(np.mean(baseline)),
        "planned": float(result.predicted_imbalance_LAYERS.mean()),
    }


def format_markdown(report: dict) -> str:
    out = ["| trace | W | slots | static | EPLB global | EPLB hier | ours | drift bytes ours/EPLB | drift imb ours / EPLB | noise slots ours / EPLB | plan ms ours fresh / drift re-plan / noise re-plan / EPLB |", "|" + "---|" * 11]
    def cell(imb, key):
        return f"{imb[key][0]:.3f} / {imb[key][1]:.2f}"

    for r in report["configs"]:
        imb = r["imbalance_mean_worst"]
        d, n, ms = r["drift"], r["noise1pct"], r["ms"]
        drift_imb = f"{d['ours_imbalance']:.3f} / {d['eplb_imbalance']:.3f}" if d["pairs"] else "-"
        drift_bytes = f"{d['ours_over_eplb_bytes']:.1%}" if d["pairs"] else "-"
        replan = f"{ms['ours_replan_median']:.1f}" if ms["ours_replan_median"] is not None else "-"
        out.append(
            f"| {r['trace']} | {r['workers']} | {r['slots']} | {cell(imb, 'static')} | {cell(imb, 'eplb_global')} | {cell(imb, 'eplb_hier')} "
            f"| {cell(imb, 'ours')} | {drift_bytes} | {drift_imb} | {n['ours_slot_fraction']:.2%} / {n['eplb_slot_fraction']:.1%} "
            f"| {ms['ours_fresh_median']:.1f} / {replan} / {ms['ours_noise_replan_median']:.1f} / {ms['eplb_median']:.1f} |"
        )
    out += ["", "Dispatch split, mean per-step imbalance (multinomial batches):", "",
            "| trace | W | slots | tokens/step | planned | weighted split (ours) | position mod replicas |", "|---|---|---|---|---|---|---|"]
    for r in report["dispatch"]:
        out.append(f"| {r['trace']} | {r['workers']} | {r['slots']} | {r['tokens_per_step']} | {r['planned']:.3f} | {r['weighted_split']:.3f} | {r['mod_split']:.3f} |")
    out += ["", "Hierarchical cost model (DeepSeek-V3 first workload, 4 nodes x 8 workers, 288 slots):", "",
            "| inter-node GB/s | global imb | hier imb | global us/layer | hier us/layer | hierarchical pays |", "|---|---|---|---|---|---|"]
    for r in report["hierarchy"]:
        out.append(f"| {r['inter_node_gbps']} | {r['global_imbalance']:.3f} | {r['hierarchical_imbalance']:.3f} | {r['global_us']:.0f} | {r['hierarchical_us']:.0f} | {r['pays']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", default=None, help="traces directory (default ../shared/traces when present)")
    parser.add_argument("--quick", action="store_true", help="fewer workloads and configurations")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine", default=None, help="machine description for the report (default: platform)")
    parser.add_argument("--date", default=None, help="date for the report (default: today)")
    parser.add_argument("--per-batch-out", default=None, help="write the per-batch JSON report here")
    parser.add_argument("--per-batch", choices=("yes", "no", "only"), default="yes",
                        help="per-batch figures too (default), not at all, or only them")
    parser.add_argument("--batches", type=int, default=None, help="sampled steps per per-batch configuration")
    parser.add_argument("--fault-aware", action="store_true",
                        help="only the fault-aware figures (placement.bench_fault): plain vs fault-aware plans, JSON to --out")
    args = parser.parse_args(argv)
    machine = f"{args.machine + ' (' if args.machine else ''}{platform.machine()} {platform.system()}, Python {platform.python_version()}, numpy {np.__version__}{')' if args.machine else ''}"
    command = shlex.join(["python", "-m", "placement.bench", *(argv if argv is not None else sys.argv[1:])])
    date = args.date or time.strftime("%Y-%m-%d")
    if args.fault_aware:
        return fault_aware_report(args, machine, command, date)
    if args.per_batch != "no":
        per_batch_report(args, machine, command, date)
    if args.per_batch == "only":
        return 0

    traces = real_traces(args.traces)
    synth_cfg = SyntheticConfig(num_phases=3 if args.quick else 4)
    traces.append(synthetic_trace(synth_cfg, seed=args.seed))
    if args.quick:
        traces = [Trace(t.name, dict(list(t.workloads.items())[:3]), t.top_k) for t in traces]
    started = time.perf_counter()
    configs = []
    for trace in traces:
        num_experts = trace.shape[1]
        bytes_per_expert = DEEPSEEK_EXPERT_BYTES if num_experts == 256 else 1
        for workers in (8, 16, 32, 64) if not args.quick else (8, 32):
            if workers > num_experts:
                continue
            seen = set()
            for redundant in (0, num_experts // 8, num_experts // 4):
                topo = topology_for(num_experts, workers, redundant)
                if topo.num_slots in seen:
                    continue
                seen.add(topo.num_slots)
                configs.append(bench_config(trace, workers, redundant, bytes_per_expert, args.seed))
                print(f"  {trace.name} W={workers} S={topo.num_slots} done", file=sys.stderr)
    main_trace = traces[0]
    dispatch = [bench_dispatch(main_trace, w, main_trace.shape[1] // 8, 2 if args.quick else 4, tokens, args.seed)
                for w in (8, 32) for tokens in (512, 4096)]
    hier = []
    for gbps in (12.5, 50.0, 400.0, 3200.0):
        verdict = hierarchical_pays(
            main_trace.workloads[next(iter(main_trace.workloads))], Topology(4, 8, -(-(main_trace.shape[1] * 9 // 8) // 32)),
            ClusterCostModel(inter_node_gbps=gbps), num_groups=default_num_groups(main_trace.shape[1], 4),
        )
        hier.append({"inter_node_gbps": gbps, **verdict.__dict__})
    report = {
        "command": command,
        "machine": machine,
        "date": date,
        "trace_shapes": {t.name: measure(t).__dict__ for t in traces},
        "configs": configs,
        "dispatch": dispatch,
        "hierarchy": hier,
        "seconds": time.perf_counter() - started,
    }
    print(format_markdown(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


def per_batch_report(args, machine: str, command: str, date: str) -> None:
    """The per-batch figures (placement.bench_batch): markdown to stdout, JSON to --per-batch-out."""
    started = time.perf_counter()
    traces = real_traces(args.traces)
    batches = args.batches or (16 if args.quick else 200)
    rows = bench_per_batch(traces, batches, 16 if args.quick else 128, args.seed, quick=args.quick,
                           log=lambda line: print(line, file=sys.stderr))
    check = cost_model_check(Path(__file__).resolve().parent.parent / "docs" / "benchmarks", traces)
    print(format_per_batch(rows))
    print()
    print(format_cost_check(check))
    if args.per_batch_out:
        report = {"command": command, "machine": machine, "date": date, "batches": batches, "rows": rows,
                  "cost_model_check": check, "seconds": time.perf_counter() - started}
        Path(args.per_batch_out).write_text(json.dumps(report, indent=1))


def fault_aware_report(args, machine: str, command: str, date: str) -> int:
    """The fault-aware figures (placement.bench_fault) on the real traces: markdown to stdout, JSON to --out."""
    from placement.bench_fault import bench_fault_aware, format_fault_aware

    started = time.perf_counter()
    traces = real_traces(args.traces)
    if not traces:
        print(f"no traces under {args.traces or '../shared/traces'}", file=sys.stderr)
        return 1
    if args.quick:
        traces = [Trace(t.name, dict(list(t.workloads.items())[:3]), t.top_k) for t in traces]
    figures = bench_fault_aware(traces, args.seed, log=lambda line: print(line, file=sys.stderr))
    print(format_fault_aware(figures))
    if args.out:
        report = {"command": command, "machine": machine, "date": date, **figures, "seconds": time.perf_counter() - started}
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

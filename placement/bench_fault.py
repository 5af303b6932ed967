"""`python -m placement.bench --fault-aware`: what the fault-aware option buys and costs.

Shapes: L MoE layers, E logical experts, S slots, W workers.

Per trace x workers (8, 16, 32; 8 per node, so 1, 2, 4 nodes) with E/8 redundant slots (at least
one; rounded up so every worker has the same slot count), the plain plan vs the fault-aware plan
(`FaultAwareOptions()`), averaged over the trace's workloads:
  - surviving load after a single-worker loss (share of the routed load whose expert keeps a live
    copy): the worst worker and the mean over workers; the worst node when there are several;
  - imbalance (max / mean worker load) of the plan, mean and worst layer: the balance cost;
  - re-plans on drift (plan on workload i, re-plan on workload i + 1, each from its own history):
    slot copies, worst-worker survival, imbalance; copies of a re-plan under 1% multiplicative
    noise; planning ms of a fresh plan.
Then the fresh figures once more with E/4 redundant slots: what more redundancy buys either way.
"""

from __future__ import annotations

import time

import numpy as np

from placement.fault_aware import FaultAwareOptions, surviving_after_node_loss, surviving_after_worker_loss
from placement.planner import plan
from placement.traces import Trace, noisy

WORKERS = (8, 16, 32)
DEFAULT = FaultAwareOptions()


def _figures(load_LE: np.ndarray, result, topology) -> dict:
    survive_W = surviving_after_worker_loss(load_LE, result.placement)
    imbalance_L = result.predicted_imbalance_LAYERS
    return {
        "worst_worker": float(survive_W.min()),
        "mean_worker": float(survive_W.mean()),
        "worst_node": float(surviving_after_node_loss(load_LE, result.placement, topology).min()) if topology.num_nodes > 1 else None,
        "imbalance_mean": float(imbalance_L.mean()),
        "imbalance_worst": float(imbalance_L.max()),
        "plan_ms": result.planning_ms,
    }


def _mean(rows: list[dict]) -> dict:
    return {key: (None if rows[0][key] is None else float(np.mean([r[key] for r in rows]))) for key in rows[0]}


def bench_trace(trace: Trace, workers: int, redundant: int, replans: bool = True, seed: int = 0) -> dict:
    """One row: plain vs fault-aware plans on every workload of `trace` (and their re-plans)."""
    from placement.bench import topology_for

    num_experts = trace.shape[1]
    topology = topology_for(num_experts, workers, redundant)
    names = list(trace.workloads)
    rng = np.random.default_rng(seed)
    figures = {"plain": [], "fault_aware": []}
    fresh = {}
    copies = {"drift_plain": 0, "drift_fault_aware": 0, "noise_plain": 0, "noise_fault_aware": 0}
    for name in names:
        load_LE = trace.workloads[name]
        fresh[name] = {"plain": plan(load_LE, topology), "fault_aware": plan(load_LE, topology, fault_aware=DEFAULT)}
        for key, result in fresh[name].items():
            result.placement.validate()
            figures[key].append(_figures(load_LE, result, topology))
        if not replans:
            continue
        jitter_LE = noisy(load_LE, 0.01, rng)
        copies["noise_plain"] += plan(jitter_LE, topology, current=fresh[name]["plain"].placement).migration.num_copies
        copies["noise_fault_aware"] += plan(jitter_LE, topology, current=fresh[name]["fault_aware"].placement,
                                            fault_aware=DEFAULT).migration.num_copies
    drift_pairs = len(names) if len(names) > 1 and replans else 0
    drifted = {"plain": [], "fault_aware": []}
    for i in range(drift_pairs):
        name, following = names[i], names[(i + 1) % len(names)]
        load_LE = trace.workloads[following]
        for key, options in (("plain", None), ("fault_aware", DEFAULT)):
            result = plan(load_LE, topology, current=fresh[name][key].placement, fault_aware=options)
            copies[f"drift_{key}"] += result.migration.num_copies
            drifted[key].append(_figures(load_LE, result, topology))
    num_layers = trace.shape[0]
    return {
        "trace": trace.name,
        "workers": workers,
        "nodes": topology.num_nodes,
        "slots": topology.num_slots,
        "workloads": len(names),
        **{key: _mean(rows) for key, rows in figures.items()},
        "drifted": {key: _mean(rows) for key, rows in drifted.items()} if drift_pairs else None,
        "worst_workload_worst_worker": {key: float(min(r["worst_worker"] for r in rows)) for key, rows in figures.items()},
        "copies_per_replan": {key: value / max(drift_pairs if key.startswith("drift") else len(names), 1) for key, value in copies.items()},
        "slots_per_plan": num_layers * topology.num_slots,
    }


def bench_fault_aware(traces: list[Trace], seed: int = 0, log=None) -> dict:
    """{"redundant_e8": rows with re-plans, "redundant_e4": fresh rows} over traces x WORKERS."""
    report = {"redundant_e8": [], "redundant_e4": []}
    for trace in traces:
        for workers in WORKERS:
            if workers > trace.shape[1]:
                continue
            started = time.perf_counter()
            report["redundant_e8"].append(bench_trace(trace, workers, max(1, trace.shape[1] // 8), True, seed))
            report["redundant_e4"].append(bench_trace(trace, workers, max(1, trace.shape[1] // 4), False, seed))
            if log:
                log(f"  fault-aware {trace.name} W={workers} done in {time.perf_counter() - started:.1f} s")
    return report


def format_fault_aware(report: dict) -> str:
    def pair(row, key, fmt):
        plain, ours = row["plain"][key], row["fault_aware"][key]
        return "-" if plain is None else f"{plain:{fmt}} / {ours:{fmt}}"

    def fresh_table(rows):
        lines = ["| trace | W | nodes | slots | worst worker loss: surviving | mean over workers | worst workload, worst worker "
                 "| worst node loss | imbalance mean | imbalance worst layer | plan ms |", "|" + "---|" * 11]
        for r in rows:
            worst = r["worst_workload_worst_worker"]
            lines.append(
                f"| {r['trace']} | {r['workers']} | {r['nodes']} | {r['slots']} | {pair(r, 'worst_worker', '.4f')} "
                f"| {pair(r, 'mean_worker', '.4f')} | {worst['plain']:.4f} / {worst['fault_aware']:.4f} | {pair(r, 'worst_node', '.3f')} "
                f"| {pair(r, 'imbalance_mean', '.4f')} | {pair(r, 'imbalance_worst', '.3f')} | {pair(r, 'plan_ms', '.0f')} |")
        return lines

    out = ["E/8 redundant slots, fresh plans, plain / fault-aware (mean over workloads; surviving = share of the routed",
           "load whose expert keeps a live copy):", "", *fresh_table(report["redundant_e8"])]
    out += ["", "E/8 redundant slots, re-plans, plain / fault-aware (each from its own fresh plan; copies per re-plan, of L x S slots):", "",
            "| trace | W | slots per plan | drift: copies | drift: worst worker loss, surviving | drift: imbalance mean | 1% noise: copies |",
            "|---|---|---|---|---|---|---|"]
    for r in report["redundant_e8"]:
        c, d = r["copies_per_replan"], r["drifted"]
        drift = (f"{d['plain']['worst_worker']:.4f} / {d['fault_aware']['worst_worker']:.4f} | "
                 f"{d['plain']['imbalance_mean']:.4f} / {d['fault_aware']['imbalance_mean']:.4f}") if d else "- | -"
        out.append(f"| {r['trace']} | {r['workers']} | {r['slots_per_plan']} | {c['drift_plain']:.0f} / {c['drift_fault_aware']:.0f} "
                   f"| {drift} | {c['noise_plain']:.1f} / {c['noise_fault_aware']:.1f} |")
    out += ["", "E/4 redundant slots, fresh plans, plain / fault-aware:", "", *fresh_table(report["redundant_e4"])]
    return "\n".join(out)

"""`moeray bench layer`: one expert-parallel MoE layer on W GPUs (default 2) under real routing skew.

Legend: W GPUs (ranks), T tokens per rank, K top-k, E experts, D hidden, F expert ffn width,
S_w slots per GPU (E / W + spare), S = W * S_w. Shapes default to DeepSeek-V3 (D 7168, F 2048,
E 256, top-8), bf16, T = 4096 per GPU (prefill-sized).

Per trace layer (DeepSeek-V3 `prefill_in4096`, ../shared/traces), three configurations run the full
layer path a serving step runs (slot map -> counts all-to-all -> host sync -> rows all-to-all ->
grouped expert kernel -> all-to-all back -> weighted combine, `SlotExperts.forward`):
  static   contiguous placement (experts e*W//E), routing sampled from the layer's real load;
  ours     placement.planner.plan for that load (replicas in the spare slots, split weights);
  uniform  contiguous placement, uniform routing: the perfectly balanced bound.
tokens/s = W * T / step time (slowest rank). Compute roofline: the layer's expert FLOPs
(2 * 3 * D * F per (token, k) pair) spread evenly over W GPUs at the measured bf16 matmul peak;
the fraction is that ideal time over the measured one (communication and routing excluded from
the ideal, so 1.0 is out of reach).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from moeray.bench import standalone, write_json
import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per GPU")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--spare", type=int, default=8, help="spare slots per GPU for replicas")
    p.add_argument("--workload", default="prefill_in4096")
    p.add_argument("--layers", default="0,10,20,30,40,50", help="MoE layer indices of the trace")
    p.add_argument("--traces", default=None, help="traces directory (default ../shared/traces)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--kernel-impl", default="auto", help="expert kernel (moeray.kernels.IMPLS)")
    p.add_argument("--combine-impl", default="auto", help="weighted un-permute (moeray.kernels.combine.IMPLS)")
    p.add_argument("--overlap-chunks", type=int, default=1, help="token chunks per step (> 1: overlapped exchanges)")
    p.add_argument("--phases", action="store_true", help="also time each phase of the step (CUDA events)")
    p.add_argument("--date", default="")
    p.add_argument("--json", default="docs/benchmarks/layer.json")


def placements(load_E: np.ndarray, W: int, S_w: int, bytes_per_expert: int):
    """(static, ours, predicted imbalances) for one layer's load."""
    from placement import Placement, Topology
    from placement.metrics import imbalance
    from placement.planner import plan

    E = len(load_E)
    static = Placement.contiguous(1, E, W, S_w)
    ours = plan(load_E[None, :], Topology.flat(W, S_w), static, bytes_per_expert)
    pred = {"static": float(imbalance(load_E[None, :], static)[0]),
            "ours": float(imbalance(load_E[None, :], ours.placement, ours.replica_weights)[0])}
    return static, ours, pred


def _rank(group, rank: int, cfg: dict, loads: dict) -> dict:
    from moeray.comm.dispatcher import AllToAllDispatcher
    from moeray.comm.slot_map import DeviceSlotMap
    from moeray.expert_parallel import SlotExperts
    from placement.traces import sample_batch_ids

    W, T, K, E, D, F = group.world_size, cfg["tokens"], cfg["top_k"], cfg["experts"], cfg["hidden"], cfg["ffn"]
    S_w = E // W + cfg["spare"]
    dev = torch.device("cuda", rank)
    # Slot contents do not change the timing; one random set serves every placement.
    w13_SHD = torch.empty(S_w, 2 * F, D, device=dev, dtype=torch.bfloat16).normal_(0, D**-0.5)
    w2_SDF = torch.empty(S_w, D, F, device=dev, dtype=torch.bfloat16).normal_(0, F**-0.5)
    x_TD = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    weights_TK = torch.full((T, K), 1.0 / K, device=dev)
    dispatcher = AllToAllDispatcher(group, S_w)
    rng = np.random.default_rng(1000 + rank)
    out = {"device": torch.cuda.get_device_name(dev), "layers": {}}
    if rank == 0:
        from triton.testing import do_bench

        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        out["matmul_tflops"] = 2 * 8192**3 / (do_bench(lambda: a @ a, warmup=25, rep=200, return_mode="median") * 1e-3) / 1e12
        del a
    experts = None
    for layer, (load_E, configs) in loads.items():
        times = {}
        for name, (log2phy_ER, replica_ER, uniform) in configs.items():
            slot_map = DeviceSlotMap.from_numpy(log2phy_ER, W * S_w, replica_ER, device=dev)
            if experts is None:
                experts = SlotExperts(w13_SHD, w2_SDF, slot_map, dispatcher, E, cfg["kernel_impl"], cfg["combine_impl"],
                                     cfg["overlap_chunks"])
                experts.record_load = False
            experts.slot_map = slot_map
            ids_TK = rng.integers(0, E, size=(T, K)) if uniform else sample_batch_ids(np.asarray(load_E), T, K, rng)
            ids_TK = torch.as_tensor(ids_TK, device=dev)
            step = lambda: experts(x_TD, ids_TK, weights_TK)  # noqa: E731
            for _ in range(3):
                step()
            samples = []
            for _ in range(cfg["iters"]):
                group.barrier()  # host sync: start together, so each sample is one lockstep step
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                samples.append(time.perf_counter() - t0)
            times[name] = statistics.median(samples)
            if cfg["phases"]:
                times[name + "_phases"] = _phases(experts, dispatcher, group, step)
        out["layers"][layer] = times
    return out


def _phases(experts, dispatcher, group, step, repeats: int = 5) -> dict[str, float]:
    """Median ms per phase over a few instrumented steps (the events cost a few us each)."""
    from moeray.bench.phases import PhaseTimer

    timer = PhaseTimer()
    experts.timer = dispatcher.timer = timer
    runs = []
    for _ in range(repeats):
        group.barrier()
        timer.start()
        step()
        runs.append(timer.phases_ms())
    experts.timer = dispatcher.timer = None
    return {phase: statistics.median(r[phase] for r in runs) for phase in runs[0]}


def _print_phases(per_rank: list, layers) -> dict:
    """Mean over layers of each phase, per configuration and rank."""
    summary = {}
    for name in ("static", "ours", "uniform"):
        for rank, r in enumerate(per_rank):
            rows = [r["layers"][layer][name + "_phases"] for layer in layers]
            mean = {phase: float(np.mean([row[phase] for row in rows])) for phase in rows[0]}
            summary[f"{name}/rank{rank}"] = mean
    phases = list(next(iter(summary.values())))
    print("phases, ms (mean over layers): " + ", ".join(phases))
    for key, mean in summary.items():
        print(f"  {key:>14}: " + "  ".join(f"{mean[p]:7.2f}" for p in phases) + f"   total {sum(mean.values()):7.2f}")
    return summary


def run(args: argparse.Namespace) -> dict:
    from moeray.bench.gpu_ranks import run_on_gpus
    from placement.traces import load_deepseek

    W = args.gpus
    if torch.cuda.device_count() < W:
        raise SystemExit(f"bench layer needs {W} GPUs, {torch.cuda.device_count()} visible")
    S_w = args.experts // W + args.spare
    load_LE = load_deepseek(args.traces).workloads[args.workload]
    bytes_per_expert = 3 * args.hidden * args.ffn * 2
    loads, predicted = {}, {}
    for layer in [int(x) for x in args.layers.split(",")]:
        load_E = load_LE[layer]
        static, ours, pred = placements(load_E, W, S_w, bytes_per_expert)
        predicted[layer] = pred
        loads[layer] = (load_E.tolist(), {
            "static": (static.log2phy[0], None, False),
            "ours": (ours.placement.log2phy[0], ours.replica_weights_LER()[0], False),
            "uniform": (static.log2phy[0], None, True),
        })
    cfg = {k: getattr(args, k) for k in ("tokens", "top_k", "experts", "hidden", "ffn", "spare", "iters",
                                         "kernel_impl", "combine_impl", "overlap_chunks", "phases")}
    per_rank = run_on_gpus(W, _rank, (cfg, loads), timeout_s=120, wait_s=900)
    flops = 2 * 3 * args.hidden * args.ffn * args.tokens * args.top_k * W  # the layer's expert FLOPs
    peak = per_rank[0]["matmul_tflops"] * 1e12
    rows = []
    for layer in loads:
        t = {name: max(r["layers"][layer][name] for r in per_rank) for name in ("static", "ours", "uniform")}
        tps = {name: W * args.tokens / v for name, v in t.items()}
        rows.append({"layer": layer, **{f"{n}_ms": v * 1e3 for n, v in t.items()},
                     **{f"{n}_tokens_per_s": v for n, v in tps.items()},
                     "ours_over_static": tps["ours"] / tps["static"], "ours_over_uniform": tps["ours"] / tps["uniform"],
                     "predicted_imbalance_static": predicted[layer]["static"], "predicted_imbalance_ours": predicted[layer]["ours"],
                     **{f"{n}_roofline_frac": flops / W / peak / v for n, v in t.items()}})
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    result = {"benchmark": "layer", "device": per_rank[0]["device"], "gpus": W, "date": args.date,
              "command": getattr(args, "command", "python -m moeray.bench.layer"), "workload": args.workload,
              "config": cfg, "matmul_tflops": per_rank[0]["matmul_tflops"], "rows": rows,
              "mean": {k: mean(k) for k in ("ours_over_static", "ours_over_uniform", "predicted_imbalance_static",
                                            "predicted_imbalance_ours", "static_ms", "ours_ms", "uniform_ms")},
              "targets": {"ours_over_static_min": 1.2, "ours_over_uniform_min": 0.9}}
    # All layers as one model step: the sum of the per-layer step times.
    total = {n: sum(r[f"{n}_ms"] for r in rows) for n in ("static", "ours", "uniform")}
    result["all_layers"] = {"ours_over_static": total["static"] / total["ours"], "ours_over_uniform": total["uniform"] / total["ours"]}
    print(f"layer EP={W} on {result['device']}: DeepSeek-V3 shapes, {args.tokens} tokens/GPU, {args.workload}")
    print(f"{'layer':>5} {'imb st':>7} {'imb ours':>8} {'static ms':>9} {'ours ms':>8} {'unif ms':>8} "
          f"{'ours/st':>8} {'ours/unif':>9} {'roof ours':>9}")
    for r in rows:
        print(f"{r['layer']:>5} {r['predicted_imbalance_static']:>7.3f} {r['predicted_imbalance_ours']:>8.3f} "
              f"{r['static_ms']:>9.2f} {r['ours_ms']:>8.2f} {r['uniform_ms']:>8.2f} {r['ours_over_static']:>8.3f} "
              f"{r['ours_over_uniform']:>9.3f} {r['ours_roofline_frac']:>9.2f}")
    m = result["mean"]
    print(f" mean {m['predicted_imbalance_static']:>7.3f} {m['predicted_imbalance_ours']:>8.3f} {m['static_ms']:>9.2f} "
          f"{m['ours_ms']:>8.2f} {m['uniform_ms']:>8.2f} {m['ours_over_static']:>8.3f} {m['ours_over_uniform']:>9.3f}"
          f"   (targets: ours/static >= 1.2, ours/uniform >= 0.9)")
    a = result["all_layers"]
    print(f"all layers as one step: ours/static {a['ours_over_static']:.3f}, ours/uniform {a['ours_over_uniform']:.3f}")
    if args.phases:
        result["phases_ms"] = _print_phases(per_rank, list(loads))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    standalone("layer", __doc__, add_arguments, run)

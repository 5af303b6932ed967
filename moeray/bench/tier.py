"""`moeray bench tier`: MoE layers whose experts exceed a GPU slot budget (issue 13), one GPU.

Legend: L layers, E experts, K top-k, T tokens of a step, D hidden, F expert FFN width, B device
slots per layer (the budget).

Shapes: Mixtral (D 4096, F 14336, E 8, top-2) and OLMoE (D 2048, F 1024, E 64, top-8), bf16, one
MoE layer per layer of the real routing trace (layers 0, 7, 15 of
olmoe_mixtral_domain_expert_counts.json under --traces), random weights. Each step routes T tokens
per layer by the trace's per-domain expert distribution (top-k distinct experts per token, drawn
in proportion): "stationary" keeps one domain, "drifting" moves to the next domain every quarter
of the run. Decode steps have --decode-tokens tokens (a list: one run each), prefill steps --prefill-tokens.

Every configuration runs the layer path a worker runs (SlotExperts with LocalDispatcher: slot map,
routing counts, grouped kernel, weighted combine; moeray.host_tier for the host slots):
  all      every expert in device slots: the upper bound (eager; a full model would also use CUDA graphs)
  fetch    B device slots (experts 0..B-1, checkpoint order), every other touched expert copied to
           a device staging slot on demand each step (PCIe, two rounds in flight)
  host     the same B resident, the rows of every other expert computed in host memory
  profiled host compute with the B hottest experts of the first domain resident, fixed (an offline
           profile: right for a stationary workload, stale once it drifts)
  ours     cold path "auto" (per slot and step: host compute or fetch, from the measured rates, and
           the next layer's likely fetches prefetched behind this layer's copies) and
           live tiering: every --check-every steps the coordinator's tier policy (moeray.tier_control:
           margin, max swaps, modelled gain from the measured rates) reads the layers' routing counts
           and swaps hot host experts into device slots with the slot writes a commit does.
           Starts from the same resident set as fetch/host; the swaps run inline and count in the
           time (in the engine they are staged off the step path).
  ours_no_prefetch  ours without the prefetch (which part of ours the prefetch is; the engine's default)
  ours_unlearnt  ours_no_prefetch splitting by the measured rates alone (tier.learn_split off: what the
           layers' timing of their own steps adds)
  ours_trial  ours_no_prefetch with the split trial (tier.split_trial on: each proposed split is
           played or replaced by fetch-everything, by which has measured shorter; what the trial
           adds. Before 2d786b3 (the 221dcdb result files) the trial was on by default, so
           ours_no_prefetch ran it, and `ours_untried` ran it off)
  fetch_live  fetch's cold path under live tiering, its swaps decided by the fetch path's step model
           (as the engine's with tier.cold_path fetch): what the tiering adds over fetch; ours over it
           is what the host split adds, with the swaps ours' own step model picks
tokens/s = T x steps / wall time of the steps (CUDA synchronised per step), the adaptation of
"ours" (and the time of its swaps) included; second_half_tokens_per_s: the steps of the second
half alone (after adapting). --repeats N runs every configuration N times: the median run (of
two, the slower) is reported, every run's tokens/s kept. Only the MoE layers are timed: a model's dense layers add the same time to every
configuration, so the fractions of "all" here are the lowest a full model would show.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from moeray.bench import standalone, write_json
from moeray.bench.tier_stack import AUTO_MODES, HOST_MARGIN, MODE_PATHS, MODES, LiveTiers, Stack, sync
from moeray.tier_counts import TierCounts

SHAPES = {
    "mixtral": dict(hidden=4096, ffn=14336, experts=8, top_k=2, trace_model="mistral"),
    "olmoe": dict(hidden=2048, ffn=1024, experts=64, top_k=8, trace_model="olmoe"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default="mixtral,olmoe")
    p.add_argument("--budgets", default="0.25,0.5", help="device slots as fractions of the experts")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--decode-tokens", default="8,64", help="tokens per decode step (one run each)")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--decode-steps", type=int, default=48)
    p.add_argument("--prefill-steps", type=int, default=12)
    p.add_argument("--domains", default="arxiv,github,book,wikipedia", help="stationary: the first; drifting: in turn")
    p.add_argument("--traces", default=None, help="traces directory (default ../shared/traces)")
    p.add_argument("--host-threads", type=int, default=None,
                   help="torch CPU threads (default: a lone GPU worker's: every CPU, less one for a launch thread)")
    p.add_argument("--fetch-slots", type=int, default=4)
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--host-margin", type=float, default=HOST_MARGIN,
                   help="auto: the modelled gain a host bet needs (tier.host_margin)")
    p.add_argument("--launch", choices=["thread", "inline"], default="inline",
                   help="a GPU step's launches inline (the worker's default) or on the launch thread "
                        "(tier.launch_thread)")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="Python's switch interval (s) while the launch thread runs (default: LaunchThread's)")
    p.add_argument("--max-swaps", type=int, default=8, help="promotions per layer and decision (ours)")
    p.add_argument("--payback-steps", type=float, default=0.0,
                   help="ours: swaps must repay their copies within this many steps of modelled gain (0: off)")
    p.add_argument("--check-every", type=int, default=4, help="steps between tier decisions (ours)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs of every configuration (the median reported)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke run of the code paths only")
    p.add_argument("--small", action="store_true", help="shapes / 16 in D and F (a smoke run)")
    p.add_argument("--json", default=None)


def routing(probs_LE: np.ndarray, tokens: int, top_k: int, rng: np.random.Generator):
    """([L, T, K] expert ids, [L, T, K] weights): top-k distinct experts per token, drawn in
    proportion to probs (Gumbel top-k), weights softmax-like positive and summing to 1."""
    gumbel_LTE = rng.gumbel(size=(probs_LE.shape[0], tokens, probs_LE.shape[1]))
    scores_LTE = np.log(np.maximum(probs_LE, 1e-12))[:, None, :] + gumbel_LTE
    ids_LTK = np.argsort(-scores_LTE, axis=2)[:, :, :top_k]
    weights_LTK = rng.random((probs_LE.shape[0], tokens, top_k)) + 0.5
    return ids_LTK, weights_LTK / weights_LTK.sum(axis=2, keepdims=True)


def routed(probs_LE: np.ndarray, tokens: int, top_k: int, rng: np.random.Generator, device: torch.device):
    """`routing` as device tensors: ([L, T, K] int64 expert ids, [L, T, K] bf16 weights)."""
    ids, weights = routing(probs_LE, tokens, top_k, rng)
    return torch.as_tensor(ids, device=device), torch.as_tensor(weights, device=device, dtype=torch.bfloat16)


def random_layer_weights(layers: int, experts: int, hidden: int, ffn: int, device: torch.device, seed: int):
    """([L] w13 [E, 2F, D], [L] w2 [E, D, F]) bf16 in host memory, drawn on `device` (fast on a GPU)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(*shape, fan_in):
        return (torch.randn(*shape, device=device, generator=gen) * fan_in ** -0.5).to(torch.bfloat16).cpu()

    w13, w2 = [], []
    for _ in range(layers):
        w13.append(draw(experts, 2 * ffn, hidden, fan_in=hidden))
        w2.append(draw(experts, hidden, ffn, fan_in=ffn))
    return w13, w2


def domain_schedule(workloads: dict, domains: list[str], steps: int, drifting: bool) -> list[str]:
    if not drifting:
        return [domains[0]] * steps
    phase = max(1, steps // len(domains))
    return [domains[min(s // phase, len(domains) - 1)] for s in range(steps)]


def run_config(stack: Stack, mode: str, phy2log_LS, schedule, probs: dict, tokens: int, top_k: int, args, rates):
    stack.reset(phy2log_LS, mode)
    rng = np.random.default_rng(args.seed)
    D = stack.w13_LEHD[0].shape[2]
    x_TD = (torch.randn(tokens, D, generator=torch.Generator().manual_seed(args.seed)) * 0.1).to(torch.bfloat16).to(stack.cuda)
    steps = []
    for domain in schedule:
        steps.append(routed(probs[domain], tokens, top_k, rng, stack.cuda))
    cold_path, tiered = MODE_PATHS[mode]
    live = LiveTiers(stack, args, rates, cold_path) if tiered else None
    hosts = [e.host for e in stack.layers if e.host is not None]
    for host in hosts:
        host.counts = TierCounts()
    step_s = []
    sync(stack.cuda)
    start = time.perf_counter()
    with torch.no_grad():
        for s, (ids_LTK, weights_LTK) in enumerate(steps):
            t0 = time.perf_counter()
            for layer, experts in enumerate(stack.layers):
                experts(x_TD, ids_LTK[layer], weights_LTK[layer])
            sync(stack.cuda)
            step_s.append(time.perf_counter() - t0)
            if live is not None and (s + 1) % args.check_every == 0:
                t1 = time.perf_counter()
                live.after(args.check_every, time.time())
                step_s[-1] += time.perf_counter() - t1  # a decision and its swaps count in the step before
    total = time.perf_counter() - start
    second_half_s = float(np.sum(step_s[len(step_s) // 2:]))
    out = {"tokens_per_s": tokens * len(steps) / total, "median_step_ms": 1e3 * float(np.median(step_s)),
           # the second half of the run: after ours adapted to the first domain (its decisions and swaps included)
           "second_half_tokens_per_s": tokens * (len(steps) - len(steps) // 2) / second_half_s, "steps": len(steps),
           # every step (a decision and its swaps in the step before): a stall (a compile) shows here
           "step_ms": [round(1e3 * t, 3) for t in step_s]}
    if hosts:
        # per layer step: how the touched cold experts were served, and the host math's wall time
        layer_steps = max(1, sum(h.counts.steps for h in hosts))
        out.update(host_experts_per_layer_step=sum(h.counts.host_experts for h in hosts) / layer_steps,
                   fetched_experts_per_layer_step=sum(h.counts.fetched_experts for h in hosts) / layer_steps,
                   host_ms_per_layer_step=1e3 * sum(h.counts.host_s for h in hosts) / layer_steps,
                   prefetched_per_layer_step=sum(h.counts.prefetched for h in hosts) / layer_steps,
                   prefetch_unused_per_layer_step=sum(h.counts.prefetch_unused for h in hosts) / layer_steps)
        if mode in AUTO_MODES:  # what the layers learnt of their splits by the end (1: nothing)
            out.update(split_bias=[round(h.split_bias, 3) for h in hosts],
                       overruled_per_layer_step=sum(h.counts.overruled for h in hosts) / layer_steps,
                       split_trial=hosts[0].trial.view())
    if live is not None:
        out.update(swaps=live.swaps, swap_ms_total=1e3 * live.swap_s, last_tier_reason=live.control.last and live.control.last.reason,
                   modelled_path=live.control.modelled_path)
    return out


def warm_up(stack: Stack, phy2log_LS, probs: dict, domains: list[str], tokens: int, top_k: int, args, rates) -> None:
    """Two untimed steps of every path at this token count: compiles the kernels and (auto) builds
    the pinned buffers and oneDNN shapes a split's first steps would (a process's once: on one
    H100 the first auto mode of a configuration ran its first step at up to 58 ms, the next auto
    mode at 17-22, fetch_live at 14)."""
    warm = domain_schedule(probs, domains, 2, False)
    E = stack.placement.num_experts
    for mode in (["all"] if stack.budget == E else ["fetch", "host", "ours_no_prefetch"]):
        run_config(stack, mode, phy2log_LS, warm, probs, tokens, top_k, args, rates)


def hottest_first(probs_LE: np.ndarray, budget: int) -> np.ndarray:
    """[L, E] slot order with each layer's `budget` hottest experts in the first slots."""
    order_LE = np.argsort(-probs_LE, axis=1, kind="stable")
    rows = []
    for order in order_LE:
        hot = sorted(order[:budget].tolist())
        rows.append(hot + [e for e in range(probs_LE.shape[1]) if e not in hot])
    return np.array(rows)


def run_shape(name: str, args, trace_dir) -> dict:
    from moeray.tier_measure import measure_rates
    from placement.traces import load_olmoe_mixtral

    shape = SHAPES[name]
    trace = load_olmoe_mixtral(trace_dir, shape["trace_model"])
    probs = {d: w / w.sum(axis=1, keepdims=True) for d, w in trace.workloads.items()}
    domains = [d for d in args.domains.split(",") if d in probs]
    D, F, E, K = shape["hidden"], shape["ffn"], shape["experts"], shape["top_k"]
    if args.small:
        D, F = D // 16, F // 16
    L = trace.shape[0]
    device = torch.device(args.device)
    w13, w2 = random_layer_weights(L, E, D, F, device, args.seed)  # the host masters
    rates = measure_rates(D, F, torch.bfloat16, device)
    print(f"{name}: rates {rates}", flush=True)
    modes = args.modes.split(",")
    results = []
    budgets = sorted({E} | {max(1, round(float(b) * E)) for b in args.budgets.split(",")}, reverse=True)
    for budget in budgets:
        stack = Stack(w13, w2, budget, rates, args.fetch_slots, device, args.host_margin, args.launch,
                      args.switch_interval)
        identity = np.tile(np.arange(E), (L, 1))
        phases = [("decode", int(t), args.decode_steps) for t in str(args.decode_tokens).split(",")]
        for phase, tokens, steps in phases + [("prefill", args.prefill_tokens, args.prefill_steps)]:
            warm_up(stack, identity, probs, domains, tokens, K, args, rates)
            for drifting in (False, True):
                schedule = domain_schedule(probs, domains, steps, drifting)
                for mode in modes:
                    if (mode == "all") != (budget == E):
                        continue
                    start = hottest_first(probs[domains[0]], budget) if mode == "profiled" else identity
                    runs = [run_config(stack, mode, start, schedule, probs, tokens, K, args, rates)
                            for _ in range(args.repeats)]
                    # the median run by tokens/s stands for the configuration; every run's figure kept (the spread)
                    r = dict(sorted(runs, key=lambda run: run["tokens_per_s"])[(len(runs) - 1) // 2],
                             tokens_per_s_runs=[run["tokens_per_s"] for run in runs])
                    row = dict(shape=name, budget=budget, budget_fraction=budget / E, phase=phase, tokens=tokens,
                               workload="drifting" if drifting else "stationary", mode=mode, **r)
                    results.append(row)
                    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        stack.pool.close()  # its launch thread, if any
        del stack
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"shape": dict(shape, name=name, hidden=D, ffn=F, layers=L, trace_layers=[0, 7, 15]), "rates": vars(rates),
            "results": results}


def summarise(shapes: list[dict]) -> list[dict]:
    """Per (shape, budget, phase, workload): tokens/s of every mode and ours / all."""
    rows = []
    for entry in shapes:
        results = entry["results"]
        upper = {(r["tokens"], r["workload"]): r["tokens_per_s"] for r in results if r["mode"] == "all"}
        keys = sorted({(r["budget"], r["phase"], r["tokens"], r["workload"]) for r in results if r["mode"] != "all"})
        for budget, phase, tokens, workload in keys:
            by_mode = {r["mode"]: r["tokens_per_s"] for r in results
                       if (r["budget"], r["phase"], r["tokens"], r["workload"]) == (budget, phase, tokens, workload)}
            all_ = upper.get((tokens, workload))
            row = dict(shape=entry["shape"]["name"], budget=budget, phase=phase, tokens=tokens, workload=workload,
                       all=all_, **by_mode)
            for name in AUTO_MODES:
                ours = by_mode.get(name)
                row[f"{name}_over_all"] = None if ours is None or not all_ else ours / all_
                row[f"{name}_beats_fetch_and_host"] = None if ours is None else all(
                    ours > by_mode[m] for m in ("fetch", "host") if m in by_mode)
            rows.append(row)
    return rows


def run(args: argparse.Namespace) -> dict:
    unknown = [m for m in args.modes.split(",") if m not in MODE_PATHS]
    if unknown:
        raise SystemExit(f"moeray bench tier: unknown --modes {unknown}; choose from {list(MODES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("moeray bench tier needs a CUDA GPU (--device cpu: a smoke run)")
    if args.host_threads:
        torch.set_num_threads(args.host_threads)
    else:
        from moeray.host_tier import host_threads

        torch.set_num_threads(host_threads(None, 1, args.launch == "thread"))  # as a lone GPU worker's
    shapes = []
    result = {
        "bench": "tier", "command": getattr(args, "command", None), "machine": platform.node(),
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None, "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "shapes": shapes,
    }
    for name in args.shapes.split(","):
        shapes.append(run_shape(name, args, args.traces))
        result["summary"] = summarise(shapes)
        write_json(args.json, result)  # after every shape: a cut-off run keeps what it measured
    for row in result["summary"]:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    return result


if __name__ == "__main__":
    standalone("tier", __doc__, add_arguments, run)

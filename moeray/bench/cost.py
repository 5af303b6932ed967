"""`moeray bench cost`: the cost model (placement.cost.StepCostModel) calibrated on this machine
from its own measurements, then its predictions of held-out cases against measured times.

Legend (docs/architecture.md): T tokens (per rank in the layer part), K top-k, E experts,
D hidden, F expert FFN width, S slots (S_w per worker), W workers (ranks), X any number of rows.

1. Calibration (placement.cost_fit).
   kernel: `expert_mlp` (impl auto: the reference on CPU, Triton on a GPU) timed on a grid of
     (rows per slot, touched slots), whole experts and a few shards (width 1/2, 1/4);
     `fit_kernel_rates_to` fits the flops rate, tile rows, weight streaming rate, per-slot seconds
     and launch floor.
   links: CPU: the Gloo all-to-all on W local ranks (each W of --workers) at 4 KiB .. 16 MiB per
     rank, fitted (`fit_link_rates_to`) on every other size; the other sizes are held out. The
     committed 2 x H200 docs/benchmarks/exchange.json gets the same split (no exchange on one GPU).
   host (CPU): on the same W ranks, layer steps of uniform routing on the static layout, 48 .. 384
     tokens per rank, their host phases only (sort, gathers, the weighted combine, the token sum):
     `fit_host_rates_to` fits fixed + per-row seconds. (A one-rank calibration mispredicts: the
     host passes cost 1.5-2x more per row there: allocator and cache state differ.)
   cores: the CPU mode's W processes share this machine's cores (len(os.sched_getaffinity(0)),
     --cores): parallel_workers = cores / --threads, a measured fact, not a fitted constant.
2. Held out (never fitted on):
   kernel: uniform cases off the grid; uneven rows per slot from OLMoE batches (T tokens drawn
     from a real trace layer's load, top-8 over 64 experts: a worker's slots get that batch's
     counts); the same with sharded slots (width_S < F: 1/2, 1/3, uneven widths).
   layer (CPU only): one MoE layer step on W Gloo ranks (moeray/bench/cost_cases.py routes an
     OLMoE batch on the layouts static, replicate, shard_replicas, group_2 / full_shard):
     dispatch (AllToAllDispatcher), expert_mlp with the slots' widths, the weighted combine and
     the sum of a token's entries. Predicted: StepCostModel.layer_phases (dedup_tokens=False) with
     the calibrated rates: compute + counts latency + 2 x rows exchange + host. Also reported: the
     bare layer_seconds (compute + 2 x exchange, every worker its own cores) with the same rates.
3. Errors: per case pred / meas; per group mean and max |log(pred / meas)| and the mean absolute
   percentage error. Timing and the others' load: moeray/bench/cost_measure.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from moeray.bench import cost_cases as cases_mod
from moeray.bench import cost_measure as measure
from moeray.bench import standalone, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--hidden", type=int, default=None, help="D (default 512 on CPU, 2048 = OLMoE on a GPU)")
    p.add_argument("--ffn", type=int, default=None, help="F (default 256 on CPU, 1024 = OLMoE on a GPU)")
    p.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on a GPU")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    p.add_argument("--cores", type=int, default=None, help="cores the CPU workers share (default: this process's affinity)")
    p.add_argument("--parts", default="kernel,exchange,layer", help="comma list of kernel, exchange, layer")
    p.add_argument("--workers", default="2,4", help="ranks of the exchange and layer parts (CPU)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank in the layer part")
    p.add_argument("--spare", type=int, default=2, help="spare slots per worker (replicas) in the layer part")
    p.add_argument("--iters", type=int, default=15, help="timed steps per layer case")
    p.add_argument("--reps", type=int, default=9, help="samples per kernel case / exchange size")
    p.add_argument("--flush-mib", type=int, default=64, help="CPU: buffer read before each kernel sample (0: none)")
    p.add_argument("--domain", default="arxiv", help="OLMoE trace domain of the batches")
    p.add_argument("--traces", default=None, help="traces directory (default ../shared/traces)")
    p.add_argument("--exchange-json", default="docs/benchmarks/exchange.json", help="committed 2 x H200 exchange bench")
    p.add_argument("--quick", action="store_true", help="small grids, few reps (tests, smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--machine", default=platform.node())
    p.add_argument("--date", default="")
    p.add_argument("--out", "--json", dest="out", default=None, help="write the result JSON here")


# ---- report -----------------------------------------------------------------------------------------


def _error_summary(rows: list[dict], pred: str = "predicted_s", meas: str = "measured_s") -> dict:
    from placement.cost_fit import log_errors

    return log_errors([r[pred] for r in rows], [r[meas] for r in rows])


def _print_rows(title: str, rows: list[dict], extra=None) -> None:
    print(f"\n{title}")
    print(f"  {'case':<34} {'meas ms':>9} {'pred ms':>9} {'pred/meas':>9}" + (f"  {extra[0]}" if extra else ""))
    for r in rows:
        tail = f"  {extra[1](r)}" if extra else ""
        print(f"  {r['name']:<34} {r['measured_s'] * 1e3:>9.3f} {r['predicted_s'] * 1e3:>9.3f} "
              f"{r['predicted_s'] / r['measured_s']:>9.3f}{tail}")


def _print_errors(errors: dict) -> None:
    print("\nerrors (|log(pred/meas)|; MAPE = mean |pred - meas| / meas)")
    print(f"  {'group':<44} {'n':>3} {'mean |log|':>10} {'max |log|':>10} {'MAPE':>7}")
    for name, e in errors.items():
        if e["count"]:
            print(f"  {name:<44} {e['count']:>3} {e['mean_abs_log']:>10.3f} {e['max_abs_log']:>10.3f} {e['mape'] * 100:>6.1f}%")


def _loadavg() -> str | None:
    """/proc/loadavg: other processes on the machine skew every CPU timing here."""
    try:
        with open("/proc/loadavg") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _machine_info(device: str, cores: int, threads: int) -> dict:
    import torch

    info = {"cpus": os.cpu_count(), "cores_shared_by_workers": cores, "torch": torch.__version__,
            "torch_threads_per_worker": threads, "torch_interop_threads": torch.get_num_interop_threads(),
            "loadavg_start": _loadavg()}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpus_visible"] = torch.cuda.device_count()
    return info


def _rates_dict(rates) -> dict:
    return dict(rates.__dict__)


# ---- parts ------------------------------------------------------------------------------------------


def _kernel_part(args, load_LE, dtype, elsize: int, errors: dict) -> tuple[object, dict]:
    from placement.cost_fit import fit_kernel_rates_to, predict_slot_case

    plan = cases_mod.kernel_plan(args.device, args.quick)
    calibration, held = cases_mod.kernel_cases(plan, load_LE, args.ffn, 8, args.seed)
    timer = measure.Timer(args.device, args.reps, args.flush_mib if args.device == "cpu" else 0)
    window = measure.window_start()
    measured_cal = measure.measure_kernel_cases(calibration, args.hidden, args.ffn, args.device, dtype, timer, args.seed)
    measured_held = measure.measure_kernel_cases(held, args.hidden, args.ffn, args.device, dtype, timer, args.seed + 1)
    load = measure.window_end(window)
    slot = lambda r: cases_mod.slot_case(r, args.hidden, args.ffn, elsize)  # noqa: E731
    rates = fit_kernel_rates_to([slot(r) for r in measured_cal],
                                source=f"fit_kernel_rates_to: {len(measured_cal)} grid launches (expert_mlp impl auto) on "
                                       f"{args.device}, D={args.hidden} F={args.ffn} {args.dtype}, moeray bench cost")
    for r in measured_cal + measured_held:
        r["predicted_s"] = predict_slot_case(slot(r), rates)
    print(f"kernel rates (fit on {len(measured_cal)} grid cases): {rates.flops_per_s / 1e9:.1f} GFLOP/s, "
          f"tile {rates.tile_rows:.1f} rows, weights {rates.weight_bytes_per_s / 1e9:.1f} GB/s, "
          f"per slot {rates.slot_s * 1e6:.1f} us, floor {rates.floor_s * 1e6:.1f} us")
    extra = ("rows  touched  impl", lambda r: f"{r['rows']:>5} {r['touched']:>7}  {r['impl']}")
    _print_rows("kernel: calibration (fitted)", measured_cal, extra)
    _print_rows("kernel: held out", measured_held, extra)
    errors["kernel calibration (in-sample)"] = _error_summary(measured_cal)
    errors["kernel held out: all"] = _error_summary(measured_held)
    for label, test in (("uniform whole", lambda n: n.startswith("uniform") and "w=" not in n),
                        ("trace rows, whole", lambda n: n.startswith("trace") and "w=" not in n),
                        ("sharded (width < 1)", lambda n: "w=" in n)):
        errors[f"kernel held out: {label}"] = _error_summary([r for r in measured_held if test(r["name"])])
    own = load["own_cpu_s"]
    share = None if load["busy_s"] is None else max(0.0, load["busy_s"] - own) / (load["wall_s"] * args.cores)
    return rates, {"rates": _rates_dict(rates), "slots": plan["slots"], "others_cpu_share": share,
                   "calibration": measured_cal, "held_out": measured_held}


def _rank_cfg(args) -> dict:
    return {"hidden": args.hidden, "ffn": args.ffn, "top_k": 8, "dtype": args.dtype, "threads": args.threads,
            "iters": args.iters, "reps": args.reps}


def _layer_cases(args, load_LE, num_workers: int) -> tuple[list, list]:
    from placement.traces import sample_batch_ids

    E, K, T = load_LE.shape[1], 8, args.tokens
    rng = np.random.default_rng(args.seed + 1000 * num_workers)
    layers = cases_mod.TRACE_LAYERS[:1] if args.quick else cases_mod.TRACE_LAYERS
    names = ("static", "replicate") if args.quick else ("static", "replicate", "shard_replicas", "group_2", "full_shard")
    cases, routed = [], []
    for layer_index, layer in enumerate(layers):
        ids_TK = sample_batch_ids(load_LE[layer_index], num_workers * T, K, rng)
        for name, layout in cases_mod.layouts_for(load_LE[layer_index], num_workers, args.spare).items():
            if name in names:
                case = cases_mod.route_layer_case(ids_TK, layout, num_workers, T, E, args.ffn)
                cases.append({**{k: case[k] for k in ("spw", "columns_WS", "entries")}, "tokens": T})
                routed.append((f"W={num_workers} L{layer} {name}", layer, name, case))
    return cases, routed


def _host_rates(host: list, per_rank: list, cores: int, errors: dict, label: str) -> tuple[object, list]:
    """Host rates fitted to the calibration steps (uniform routing) that ran first on these ranks."""
    from placement.cost_fit import fit_host_rates_to

    rows = []
    for i, (name, case) in enumerate(host):
        summary = measure.summarize_steps(per_rank, i, cores)
        sent = float(case["rows_S"].sum()) / len(per_rank)  # every rank sends and receives the mean (uniform routing)
        rows.append({"name": name, "rows": sent, "measured_s": summary["measured_host_s"],
                     "phases_s_by_rank": summary["measured_phases_s_by_rank"], "others_cpu_share": summary["others_cpu_share"]})
    rates = fit_host_rates_to([(r["rows"], r["measured_s"]) for r in rows],
                              source=f"fit_host_rates_to: {len(rows)} layer steps of uniform routing on {label}, host phases")
    for r in rows:
        r["predicted_s"] = rates.fixed_s + rates.per_row_s * r["rows"]
    errors[f"host {label} calibration (in-sample)"] = _error_summary(rows)
    return rates, rows


def _workers_part(args, num_workers: int, load_LE, shape, kernel_rates, parts, errors) -> tuple[dict, dict | None]:
    """On `num_workers` ranks (one set of processes): the exchange bench, then the host calibration
    steps and the held-out layer steps. Returns the exchange block and the layer block (or None)."""
    from placement.cost import StepCostModel

    sizes = cases_mod.exchange_sizes(args.quick)
    layer = "layer" in parts and load_LE is not None
    host, cases, routed = [], [], []
    if layer:
        host = cases_mod.host_cases(num_workers, 64, 8, args.spare, args.ffn, args.seed + 7 * num_workers, args.quick)
        cases, routed = _layer_cases(args, load_LE, num_workers)
    timed = [{k: c[k] for k in ("spw", "columns_WS", "entries", "tokens")} for c in [c for _, c in host] + cases]
    per_rank = measure.run_on_ranks(num_workers, _rank_cfg(args), sizes, timed)
    measured = [(float(b), max(r["exchange_s"][i] for r in per_rank)) for i, b in enumerate(sizes)]
    label = f"gloo W={num_workers}"
    links, table = cases_mod.exchange_errors(measured, label, num_workers)
    exchange = {"rates": _rates_dict(links), "rows": table, "ranks": num_workers,
                "others_cpu_share": measure.others_share([r["exchange_window"] for r in per_rank], args.cores)}
    errors[f"exchange {label} held out"] = _error_summary([r for r in table if not r["fitted"]])
    errors[f"exchange {label} fitted (in-sample)"] = _error_summary([r for r in table if r["fitted"]])
    if not layer:
        return exchange, None
    host_rates, host_rows = _host_rates(host, per_rank, args.cores, errors, label)
    parallel = args.cores / args.threads
    model = StepCostModel(shape, kernel_rates, links, dedup_tokens=False, host=host_rates, parallel_workers=parallel)
    rows = []
    for i, (name, layer_id, layout, case) in enumerate(routed):
        predicted = cases_mod.predict_layer_case(case, model, num_workers, num_workers * args.tokens)
        rows.append({"name": name, "workers": num_workers, "layer": layer_id, "layout": layout,
                     "slots_per_worker": case["spw"], "parallel_workers": parallel,
                     "sharded_slots": int(((case["width_S"] > 0) & (case["width_S"] < 1)).sum()), **predicted,
                     **measure.summarize_steps(per_rank, len(host) + i, args.cores)})
    W = f"W={num_workers}"
    errors[f"layer {W}"] = _error_summary(rows)
    errors[f"layer {W}: vs slowest rank's median step"] = _error_summary(
        [{"p": r["predicted_s"], "m": max(r["measured_rank_step_s"])} for r in rows], "p", "m")
    errors[f"layer {W}: compute phase"] = _error_summary(rows, "predicted_compute_s", "measured_compute_s")
    errors[f"layer {W}: rest (exchange + host)"] = _error_summary(
        [{"p": r["predicted_exchange_s"] + r["predicted_host_s"], "m": r["measured_rest_s"]} for r in rows], "p", "m")
    errors[f"layer {W}: exchange phases"] = _error_summary(rows, "predicted_exchange_s", "measured_exchange_s")
    errors[f"layer {W}: host phases"] = _error_summary(rows, "predicted_host_s", "measured_host_s")
    errors[f"layer {W}: bare layer_seconds"] = _error_summary(rows, "predicted_bare_s", "measured_s")
    return exchange, {"host_rates": _rates_dict(host_rates), "host_calibration": host_rows, "rows": rows}


def run(args: argparse.Namespace) -> dict:
    import torch

    from placement.cost import ExpertShape, exchange_rows
    from placement.traces import load_olmoe_mixtral

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench cost --device cuda: no CUDA device visible")
    args.hidden = args.hidden or (2048 if device == "cuda" else 512)
    args.ffn = args.ffn or (1024 if device == "cuda" else 256)
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    args.cores = args.cores or len(os.sched_getaffinity(0))
    if args.quick:
        args.reps, args.iters = min(args.reps, 5), min(args.iters, 4)
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    elsize = torch.empty(0, dtype=dtype).element_size()
    shape = ExpertShape(f"olmoe-like D={args.hidden} F={args.ffn} {args.dtype}", args.hidden, args.ffn, 8, elsize, elsize)
    try:
        load_LE = load_olmoe_mixtral(args.traces, "olmoe").workloads[args.domain]
    except FileNotFoundError:
        load_LE = None
        print("bench cost: no traces directory: trace-driven cases skipped")
    started = time.perf_counter()
    result = {"benchmark": "cost", "machine": args.machine, "device": device, "date": args.date,
              "command": getattr(args, "command", "python -m moeray.bench.cost"),
              **_machine_info(device, args.cores, args.threads),
              "shape": {"hidden": args.hidden, "ffn": args.ffn, "experts": 64, "top_k": 8, "dtype": args.dtype},
              "threads": args.threads, "quick": args.quick, "trace": f"olmoe {args.domain}" if load_LE is not None else None}
    errors = {}
    print(f"bench cost on {device} ({result.get('gpu') or result.get('cpu_model', '')}), shape D={args.hidden} "
          f"F={args.ffn} {args.dtype}, {args.threads} thread(s), {args.cores} core(s)")

    kernel_rates = None
    if "kernel" in parts or "layer" in parts:
        kernel_rates, result["kernel"] = _kernel_part(args, load_LE, dtype, elsize, errors)

    if "exchange" in parts or "layer" in parts:
        exchange = {}
        if os.path.exists(args.exchange_json):
            rates, table = cases_mod.exchange_errors([(float(b), t) for b, t in exchange_rows(args.exchange_json)], "2xH200 NCCL")
            exchange["h200_json"] = {"rates": _rates_dict(rates), "rows": table, "source": args.exchange_json}
            errors["exchange 2xH200 JSON held out"] = _error_summary([r for r in table if not r["fitted"]])
        if device == "cpu":
            layer_rows, calibration = [], {}
            for W in [int(w) for w in args.workers.split(",")]:
                exchange[f"cpu_gloo_W{W}"], block = _workers_part(args, W, load_LE, shape, kernel_rates, parts, errors)
                if block is not None:
                    layer_rows += block.pop("rows")
                    calibration[f"W{W}"] = block
            if "layer" in parts:
                result["layer"] = ({"skipped": "no traces directory"} if load_LE is None else
                                   {"tokens_per_rank": args.tokens, "spare_slots": args.spare, "iters": args.iters,
                                    "parallel_workers": args.cores / args.threads, "host": calibration, "rows": layer_rows})
        elif "layer" in parts:
            result["layer"] = {"skipped": "the layer part runs on CPU Gloo ranks only (one GPU: no exchange)"}
            print("\nlayer part skipped on a GPU (needs CPU Gloo ranks; GPU layers: moeray bench layer)")
        result["exchange"] = exchange
        for key, block in exchange.items():
            rates = block["rates"]
            print(f"\nlink rates {key} (fit on every other size): {rates['intra_node_bytes_per_s'] / 1e9:.2f} GB/s, "
                  f"latency {rates['latency_s'] * 1e6:.1f} us")
            _print_rows(f"exchange {key} (* = fitted)", [{**r, "name": r["name"] + (" *" if r["fitted"] else "")} for r in block["rows"]])
    if result.get("layer", {}).get("rows"):
        _print_rows("layer steps (held out): compute + counts latency + 2 x exchange + host", result["layer"]["rows"],
                    ("compute meas/pred   exch meas/pred   host meas/pred   bare ms",
                     lambda r: f"{r['measured_compute_s'] * 1e3:>6.2f}/{r['predicted_compute_s'] * 1e3:<6.2f}  "
                               f"{r['measured_exchange_s'] * 1e3:>6.2f}/{r['predicted_exchange_s'] * 1e3:<6.2f}  "
                               f"{r['measured_host_s'] * 1e3:>6.2f}/{r['predicted_host_s'] * 1e3:<6.2f}  "
                               f"{r['predicted_bare_s'] * 1e3:>6.2f}"))
    result["errors"] = errors
    result["wall_s"] = time.perf_counter() - started
    result["loadavg_end"] = _loadavg()
    _print_errors(errors)
    print(f"\nwall {result['wall_s']:.1f} s")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    standalone("cost", __doc__, add_arguments, run)

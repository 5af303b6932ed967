"""`moeray bench rebalance`: live rebalancing in the local CPU mode, measured.

1. Drift: a stream whose hot experts move every `phase_steps` steps. For each drift: the realised
   imbalance (rows each worker actually computed) right after it, and how many steps until it is
   <= the target again, next to the rebalance log (predicted before/after, realised, slots and
   bytes moved, planning / transfer / stall ms).
2. Stall: the longest step while a migration is staged (from the coordinator's decision to the
   commit step, included) against the median of the steps just before that migration in the same
   phase: same placement, same load, so only the migration's own work can make them differ. (After a
   drift every step is slower until the commit, because the old placement meets the new load.)
3. Stats overhead: routing statistics on vs off inside one engine, on the same batches, in
   alternating ABBA blocks of 8 steps; the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np

from moeray.bench import standalone, write_json

from moeray.config import EngineConfig, ParallelConfig, RebalanceConfig, StatsConfig, tiny_model_config
from moeray.engine import Engine
from moeray.generation.driver import GenerationDriver
from moeray.generation.messages import NewSequence, StepPlan
from moeray.generation.sampling import SamplingParams
from moeray.models.tiny import write_tiny_model
from moeray.streams import DriftingStream

_SCORE = SamplingParams(max_tokens=1)


def score_step(driver: GenerationDriver, ids: np.ndarray) -> None:
    """One engine step over `ids`: the batch split into one prompt per worker (each worker's
    attention gets a share), scored (prefill only), as the benchmark's unit of load."""
    request_ids = [driver.add_request(part.tolist(), _SCORE, score=True)
                   for part in np.array_split(ids, len(driver.engine.workers)) if len(part)]
    driver.run_to_completion(request_ids)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--redundant-slots", type=int, default=2)
    p.add_argument("--tokens-per-step", type=int, default=512)
    p.add_argument("--phase-steps", type=int, default=60)
    p.add_argument("--phases", type=int, default=4)
    p.add_argument("--window-steps", type=int, default=16)
    p.add_argument("--check-interval", type=int, default=4)
    p.add_argument("--snapshot-interval", type=int, default=4)
    p.add_argument("--target", type=float, default=1.15)
    p.add_argument("--hot-fraction", type=float, default=0.9, help="share of tokens drawn from the hot ids")
    p.add_argument("--overhead-steps", type=int, default=120)
    p.add_argument("--overhead-rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--seed", type=int, default=0)


def _model_overrides(args) -> dict:
    return dict(num_experts=args.experts, top_k=2, num_hidden_layers=args.layers, hidden_size=args.hidden,
                moe_intermediate_size=args.ffn, vocab_size=512, num_attention_heads=4, num_key_value_heads=2,
                head_dim=args.hidden // 4)


def _config(args, stats: bool, rebalance: bool) -> EngineConfig:
    model = tiny_model_config(**_model_overrides(args))
    return EngineConfig(
        model=model,
        parallel=ParallelConfig(num_workers=args.workers, redundant_slots_per_worker=args.redundant_slots),
        stats=StatsConfig(enabled=stats, snapshot_interval_steps=args.snapshot_interval),
        rebalance=RebalanceConfig(enabled=rebalance, window_steps=args.window_steps,
                                  check_interval_steps=args.check_interval, min_gain=1.05, cooldown_s=0.0,
                                  min_tokens=1000, confirmations=1),
    )


def run_drift(args, ckpt: str) -> dict:
    config = _config(args, stats=True, rebalance=True)
    stream = DriftingStream(config.model.vocab_size, args.tokens_per_step, args.phase_steps,
                            hot_fraction=args.hot_fraction, seed=args.seed)
    step_wall_ms, step_start, step_version = [], [], []
    with Engine(config, ckpt) as engine:
        driver = GenerationDriver(engine)
        score_step(driver, stream.next_batch())  # warm-up outside the record
        stream.step = 0
        for _ in range(args.phase_steps * args.phases):
            ids = stream.next_batch()
            step_start.append(time.time())
            t = time.perf_counter()
            score_step(driver, ids)
            step_wall_ms.append(1e3 * (time.perf_counter() - t))
            step_version.append(engine.placement().version)
        time.sleep(0.5)  # let the last fire-and-forget snapshots land before reading the log
        stats = engine.stats()
        errors = list(engine.rebalance_errors)
    timeline = windowed_imbalance(stats["history"], args.window_steps)
    instant = windowed_imbalance(stats["history"], 1)  # each snapshot range on its own
    drifts = []
    for phase in range(1, args.phases):
        drift_step = phase * args.phase_steps + 1  # engine steps count the warm-up step
        after = [t for t in instant if drift_step < t["step"] <= drift_step + args.phase_steps]
        if not after:
            continue
        first = after[0]  # the old placement on the new load
        recovered = next((t for t in after[1:] if t["worst"] <= args.target), None)
        windowed_after = [t for t in timeline if drift_step < t["step"] <= drift_step + args.phase_steps]
        drifts.append({
            "drift_at_step": drift_step,
            "realised_worst_right_after": first["worst"], "realised_mean_right_after": first["mean"],
            "steps_to_target": None if recovered is None else recovered["step"] - drift_step,
            "realised_worst_end_of_phase": windowed_after[-1]["worst"],
            "realised_mean_end_of_phase": windowed_after[-1]["mean"],
        })
    records = stats["rebalances"]
    walls = np.asarray(step_wall_ms)
    drift_index = [phase * args.phase_steps for phase in range(args.phases)]  # record index of each phase start
    stalls = []
    for r in records:
        if r["committed_at_step"] is None:
            continue
        commit = r["committed_at_step"] - 1  # record index (engine steps count the warm-up)
        first = int(np.searchsorted(step_start, r["started_at"]))
        # Baseline: the steps just before this migration with the same placement and the same
        # (post-drift) load, so only the migration's own work can make the steps differ.
        phase_start = max(d for d in drift_index if d <= first)
        lo = max(first - 8, phase_start)
        before = walls[lo:first][np.asarray(step_version[lo:first]) == r["version"] - 1]
        if len(before) < 3 or commit < first:
            continue
        during = walls[first:commit + 1]  # prepare steps and the commit step
        stalls.append({"version": r["version"], "baseline_ms": float(np.median(before)),
                       "max_during_ms": float(during.max()), "steps": int(len(during)),
                       "ratio": float(during.max() / np.median(before)), "transfer_ms": r["transfer_ms"]})
    return {
        "timeline": timeline,
        "instant": instant,
        "drifts": drifts,
        "rebalances": records,
        "drifts_detected": stats["drifts_detected"],
        "errors": errors,
        "median_step_ms": float(np.median(walls)),
        "stalls": stalls,
        "max_stall_ratio": max((x["ratio"] for x in stalls), default=None),
    }


def windowed_imbalance(history: list, window_steps: int) -> list[dict]:
    """Realised imbalance over a sliding window of `window_steps` steps, from the rows each worker
    computed (history entries: step_lo, step_hi, version, rows_LW). One point per step range end."""
    out = []
    history = sorted(history, key=lambda h: h[0])  # ranges complete out of order across workers
    for i, (_, step_hi, version, _) in enumerate(history):
        rows_LW, steps, j = 0, 0, i
        while j >= 0 and steps < window_steps:
            rows_LW = rows_LW + np.asarray(history[j][3], dtype=np.float64)
            steps += history[j][1] - history[j][0]
            j -= 1
        per_layer = rows_LW.max(axis=1) / np.maximum(rows_LW.mean(axis=1), 1e-9)
        out.append({"step": step_hi, "version": version, "mean": float(per_layer.mean()), "worst": float(per_layer.max())})
    return out


def run_overhead(args, ckpt: str) -> dict:
    """Stats on vs off in ONE engine, alternating blocks of steps on the same batches: separate
    engine runs differ by more than the effect (seen here: medians 155-222 ms between runs)."""
    config = _config(args, stats=True, rebalance=False)
    stream = DriftingStream(config.model.vocab_size, args.tokens_per_step, 10**9, hot_fraction=0.0, seed=args.seed)
    block = 8
    batches = [stream.next_batch() for _ in range(block)]
    walls = {"on": [], "off": []}
    block_ratios = []
    with Engine(config, ckpt) as engine:
        driver = GenerationDriver(engine)
        for ids in batches:  # warm-up
            score_step(driver, ids)
        pairs = args.overhead_rounds * max(1, args.overhead_steps // (2 * block))
        for pair in range(pairs):
            order = ("off", "on") if pair % 2 == 0 else ("on", "off")  # ABBA: no order bias
            block_median = {}
            for label in order:
                engine.set_stats_recording(label == "on")
                times = []
                for ids in batches:
                    t = time.perf_counter()
                    score_step(driver, ids)
                    times.append(1e3 * (time.perf_counter() - t))
                walls[label].extend(times)
                block_median[label] = float(np.median(times))
            block_ratios.append(block_median["on"] / block_median["off"])
    on, off = np.median(walls["on"]), np.median(walls["off"])
    return {"median_step_ms_on": float(on), "median_step_ms_off": float(off),
            "overhead_pct": float(100 * (np.median(block_ratios) - 1)),
            "overhead_pct_of_medians": float(100 * (on / off - 1)),
            "block_ratio_p25_p75": [float(np.percentile(block_ratios, 25)), float(np.percentile(block_ratios, 75))],
            "steps_each": len(walls["on"]), "block_pairs": len(block_ratios)}


def run_hot_path_overhead(args, ckpt: str, repeats: int = 60) -> dict:
    """The statistics' cost on the step path itself, in one process (no Ray, no other workers):
    the model forward with recording on vs off, alternating, same batch."""
    from moeray.worker import Worker
    from placement import Placement

    config = _config(args, stats=True, rebalance=False).model_copy(
        update={"parallel": ParallelConfig(num_workers=1, redundant_slots_per_worker=0)})
    placement = Placement.contiguous(config.model.num_moe_layers, config.model.num_experts, 1, config.slots_per_worker)
    worker = Worker(0, config, ckpt, placement)
    prompt = tuple(DriftingStream(config.model.vocab_size, args.tokens_per_step, 10**9, seed=args.seed).next_batch().tolist())
    blocks = -(-len(prompt) // config.cache.block_size) + 1
    times = {True: [], False: []}
    for i in range(repeats):
        for recording in ((True, False) if i % 2 else (False, True)):
            worker.set_stats_recording(recording)
            plan = StepPlan(new=(NewSequence(f"r{i}-{recording}", prompt, _SCORE, blocks, score=True),))
            t = time.perf_counter()
            worker.step(plan)
            times[recording].append(1e3 * (time.perf_counter() - t))
    on, off = float(np.median(times[True])), float(np.median(times[False]))
    return {"median_ms_on": on, "median_ms_off": off, "overhead_pct": 100 * (on / off - 1), "repeats": repeats}


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="moeray-bench-") as ckpt:
        write_tiny_model(ckpt, family="qwen3_moe", seed=args.seed, **_model_overrides(args))
        out = {"machine": f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores", "args": vars(args) | {"func": None},
               "drift": run_drift(args, ckpt), "stats_overhead": run_overhead(args, ckpt),
               "stats_hot_path": run_hot_path_overhead(args, ckpt)}
    print_report(out, args.target)
    write_json(args.json, out)
    return out


def print_report(out: dict, target: float) -> None:
    d = out["drift"]
    print(f"\nrebalances ({len(d['rebalances'])}):")
    print(" ver  step  pred_before  pred_after  realised(mean/worst)  slots  bytes      plan_ms  transfer_ms  stall_ms")
    for r in d["rebalances"]:
        realised = "-" if r["realised_after"] is None else f"{r['realised_after']:.3f}/{r['realised_after_worst']:.3f}"
        print(f" {r['version']:3d}  {r['committed_at_step'] or -1:4d}  {r['predicted_before']:11.3f}  {r['predicted_after']:10.3f}"
              f"  {realised:>20}  {r['slots_moved']:5d}  {r['bytes_moved']:9d}  {r['planning_ms']:7.1f}"
              f"  {(r['transfer_ms'] or 0):11.1f}  {(r['stall_ms'] or 0):8.2f}")
    print(f"\ndrifts (realised = rows each worker computed; target: worst layer <= {target}):")
    for x in d["drifts"]:
        print(f"  step {x['drift_at_step']:4d}: right after: worst layer {x['realised_worst_right_after']:.2f} "
              f"(mean {x['realised_mean_right_after']:.2f}) -> worst <= target after {x['steps_to_target']} steps; "
              f"last window of the phase: worst {x['realised_worst_end_of_phase']:.3f}, mean {x['realised_mean_end_of_phase']:.3f}")
    print("\nsteps during each migration (decision to commit) vs the steps just before it (same placement, same load):")
    for x in d["stalls"]:
        print(f"  v{x['version']}: {x['steps']} steps, longest {x['max_during_ms']:.1f} ms vs {x['baseline_ms']:.1f} ms before "
              f"= {x['ratio']:.2f}x; transfer took {x['transfer_ms']:.0f} ms")
    print(f"  worst: {d['max_stall_ratio']}x (target <= 1.5x)")
    h = out["stats_hot_path"]
    print(f"stats on the step path, one process: on {h['median_ms_on']:.2f} ms vs off {h['median_ms_off']:.2f} ms "
          f"-> {h['overhead_pct']:+.2f}% ({h['repeats']} alternating pairs)")
    o = out["stats_overhead"]
    lo, hi = o["block_ratio_p25_p75"]
    print(f"stats overhead (median of {o['block_pairs']} ABBA block pairs, {o['steps_each']} steps each way): "
          f"{o['overhead_pct']:+.2f}% (interquartile {100 * (lo - 1):+.1f}% .. {100 * (hi - 1):+.1f}%); "
          f"medians on {o['median_step_ms_on']:.2f} ms vs off {o['median_step_ms_off']:.2f} ms")


def main(argv=None) -> dict:
    return standalone("rebalance", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()

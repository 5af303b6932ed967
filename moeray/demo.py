"""`moeray demo`: the local mode end to end on CPU workers.

Starts a local Ray cluster, saves a small random MoE model as a checkpoint, starts the worker
group, streams skewed batches (Zipf-distributed token ids, so some experts run hot) through it,
checks the first batch against the single-process reference, and prints per-worker and
per-expert load.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from moeray.config import EngineConfig, ParallelConfig, RebalanceConfig, StatsConfig, tiny_model_config
from moeray.engine import Engine
from moeray.streams import zipf_tokens
from moeray.models.checkpoint import load_reference_model, save_checkpoint
from moeray.models.moe_model import MoEModel, init_random_


class DemoOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    workers: int = Field(default=4, ge=1, le=64)
    experts: int = Field(default=16, ge=1)
    top_k: int = Field(default=2, ge=1)
    layers: int = Field(default=4, ge=1)
    steps: int = Field(default=40, ge=1)
    tokens_per_step: int = Field(default=256, ge=1)
    zipf: float = Field(default=1.2, gt=1.0, description="token-id skew; larger is more skewed")
    redundant_slots: int = Field(default=1, ge=0)
    rebalance: bool = Field(default=True, description="live rebalancing by the coordinator")
    seed: int = 0


def _bar(value: float, peak: float, width: int = 30) -> str:
    filled = int(round(width * value / peak)) if peak > 0 else 0
    return "#" * filled + "." * (width - filled)


def run_demo(opts: DemoOptions) -> dict:
    model_cfg = tiny_model_config(num_experts=opts.experts, top_k=opts.top_k, num_layers=opts.layers)
    config = EngineConfig(
        model=model_cfg,
        parallel=ParallelConfig(num_workers=opts.workers, redundant_slots_per_worker=opts.redundant_slots),
        stats=StatsConfig(snapshot_interval_steps=4),
        rebalance=RebalanceConfig(enabled=opts.rebalance, window_steps=16, check_interval_steps=4, cooldown_s=1.0),
        seed=opts.seed,
    )
    rng = np.random.default_rng(opts.seed)
    with tempfile.TemporaryDirectory(prefix="moeray-demo-") as ckpt:
        save_checkpoint(init_random_(MoEModel(model_cfg), opts.seed), ckpt)
        reference = load_reference_model(ckpt)
        t0 = time.perf_counter()
        with Engine(config, ckpt) as engine:
            startup_s = time.perf_counter() - t0
            print(f"started {opts.workers} workers ({config.slots_per_worker} slots each) in {startup_s:.1f}s")
            step_ms = []
            for step in tqdm(range(opts.steps), desc="serving", unit="step"):
                ids = zipf_tokens(model_cfg.vocab_size, opts.tokens_per_step, opts.zipf, rng)
                t = time.perf_counter()
                logits = engine.step(ids)
                step_ms.append(1e3 * (time.perf_counter() - t))
                if step == 0:
                    want = reference(torch.as_tensor(ids)).numpy()
                    err = float(np.abs(logits - want).max() / np.abs(want).max())
                    if err > 1e-5:
                        raise AssertionError(f"engine output differs from the reference: max rel error {err:.2e}")
            load_LE = engine.load()
            worker_load_LW = engine.worker_load(load_LE)
            imbalance_L = engine.imbalance(load_LE)
            stats = engine.stats()

    total = load_LE.sum(axis=0)
    print(f"\nfirst batch vs single-process reference: max relative error {err:.1e}")
    print(f"step time: median {np.median(step_ms):.1f} ms, p90 {np.percentile(step_ms, 90):.1f} ms "
          f"({opts.tokens_per_step} tokens/step)")
    print("\nper-worker load (routed pairs, all layers):")
    per_worker = worker_load_LW.sum(axis=0)
    for w, value in enumerate(per_worker):
        print(f"  worker {w:2d} {_bar(value, per_worker.max())} {int(value):8d}")
    print("\nper-expert load (routed pairs, all layers):")
    for e, value in enumerate(total):
        print(f"  expert {e:3d} {_bar(value, total.max())} {int(value):8d}")
    print(f"\nimbalance of the final placement (v{stats['placement_version']}) on the whole run's load, per layer: "
          f"{np.round(imbalance_L, 2).tolist()}  mean {imbalance_L.mean():.2f}, worst {imbalance_L.max():.2f}")
    if stats["rebalances"]:
        print("\nlive rebalances (imbalance predicted on the coordinator's window; realised = rows computed):")
        for r in stats["rebalances"]:
            realised = "-" if r["realised_after"] is None else f"{r['realised_after']:.2f}"
            print(f"  v{r['version']} at step {r['committed_at_step']}: {r['predicted_before']:.2f} -> predicted "
                  f"{r['predicted_after']:.2f}, realised {realised}; {r['slots_moved']} slots / "
                  f"{r['bytes_moved'] / 1e6:.1f} MB moved; plan {r['planning_ms']:.0f} ms, transfer "
                  f"{(r['transfer_ms'] or 0):.0f} ms, stall {(r['stall_ms'] or 0):.1f} ms")
    return {
        "max_rel_error": err,
        "imbalance_mean": float(imbalance_L.mean()),
        "imbalance_worst": float(imbalance_L.max()),
        "median_step_ms": float(np.median(step_ms)),
        "load_LE": load_LE,
        "rebalances": stats["rebalances"],
    }

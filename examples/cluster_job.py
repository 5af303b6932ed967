"""A moeray job on a Ray cluster (`ray up cluster.yaml`, then `ray job submit ... -- python
examples/cluster_job.py --workers 16`), or on this machine (`--device cpu`, a local cluster).

It asks the autoscaler for the GPUs and waits for them, writes the same random checkpoint on every
node (workers read their slots from a local path; a real deployment points `--checkpoint` at
storage every node mounts), starts one worker per GPU,
streams drifting skewed batches, and prints step times, the worst layer's imbalance and what the
coordinator did. Everything here is the public API: EngineConfig, Engine, Engine.stats().
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from moeray.config import EngineConfig, ModelConfig, ParallelConfig, RebalanceConfig, StatsConfig
from moeray.engine import Engine
from moeray.ray_cluster import ensure_ray
from moeray.streams import DriftingStream


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=8, help="one per GPU (or CPU worker with --device cpu)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--checkpoint", default=None, help="a checkpoint every node can read (default: a random one)")
    p.add_argument("--random-checkpoint-dir", default="/tmp/moeray-cluster-job",
                   help="where the random checkpoint is written on every node")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--redundant-slots", type=int, default=2)
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--phase-steps", type=int, default=50, help="steps between drifts of the hot tokens")
    p.add_argument("--wait-for-gpus-s", type=float, default=1800, help="how long to wait for GPU nodes to join")
    return p.parse_args(argv)


@ray.remote(num_cpus=0)
def _write_random_checkpoint(model_cfg: dict, path: str, seed: int) -> str:
    from moeray.models.checkpoint import save_checkpoint
    from moeray.models.moe_model import MoEModel, init_random_

    save_checkpoint(init_random_(MoEModel(ModelConfig(**model_cfg)), seed), path)
    return ray.get_runtime_context().get_node_id()


def wait_for_gpus(count: int, timeout_s: float) -> None:
    """Ask the autoscaler for `count` GPUs and wait until the cluster has them (nodes of a `ray up`
    cluster with min_workers 0 start on demand and take minutes to boot and install)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * count)
    deadline = time.monotonic() + timeout_s
    while ray.cluster_resources().get("GPU", 0) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"the cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs after {timeout_s:g} s, "
                             f"{count} needed")
        time.sleep(10)  # polling the autoscaler's progress; nothing to wait on instead


def random_checkpoint_on_every_node(model_cfg: ModelConfig, path: str, seed: int = 0) -> None:
    """Deterministic weights, so every node's copy is identical."""
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    ray.get([_write_random_checkpoint.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
             .remote(model_cfg.model_dump(), path, seed) for n in nodes])


def main(argv=None) -> dict:
    args = parse_args(argv)
    ensure_ray()
    model_cfg = ModelConfig(vocab_size=4096, hidden_size=args.hidden, moe_intermediate_size=args.ffn,
                            num_layers=args.layers, num_experts=args.experts, top_k=args.top_k,
                            dtype="bfloat16" if args.device == "cuda" else "float32")
    config = EngineConfig(
        model=model_cfg,
        parallel=ParallelConfig(num_workers=args.workers, device=args.device, redundant_slots_per_worker=args.redundant_slots,
                                placement_timeout_s=max(120.0, args.wait_for_gpus_s)),
        stats=StatsConfig(snapshot_interval_steps=8),
        rebalance=RebalanceConfig(window_steps=32, check_interval_steps=8, cooldown_s=2.0, min_tokens=0),
    )
    if args.device == "cuda":
        wait_for_gpus(args.workers, args.wait_for_gpus_s)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = args.random_checkpoint_dir
        random_checkpoint_on_every_node(model_cfg, checkpoint)
    stream = DriftingStream(model_cfg.vocab_size, args.tokens_per_step, args.phase_steps, hot_tokens=8, seed=0)
    step_ms = []
    with Engine(config, checkpoint) as engine:
        for step in range(args.steps):
            t0 = time.perf_counter()
            engine.step(stream.next_batch())
            step_ms.append((time.perf_counter() - t0) * 1e3)
            if (step + 1) % max(1, args.steps // 10) == 0:
                worst = float(engine.imbalance().max())
                print(f"step {step + 1:5d}  step {np.median(step_ms[-10:]):7.1f} ms  worst layer imbalance {worst:.3f}  "
                      f"placement v{engine.placement().version}", flush=True)
        stats = engine.stats()
    print(f"{len(stats['rebalances'])} rebalances; imbalance now mean {stats['imbalance_mean']:.3f}, "
          f"worst {stats['imbalance_worst']:.3f}; median step {np.median(step_ms):.1f} ms")
    return {"step_ms": step_ms, "rebalances": len(stats["rebalances"]), "imbalance_worst": stats["imbalance_worst"]}


if __name__ == "__main__":
    main()

"""A moeray job on a Ray cluster (`ray up cluster.yaml`, then `ray job submit ... -- python
examples/cluster_job.py --workers 16`), or on this machine (`--device cpu`, a local cluster).

It asks the autoscaler for the GPUs and waits for them (saying so; on a local cluster without
GPUs it stops at once with an error), writes the same random model (HF format,
a Qwen3-MoE-family model) on every node (workers read their slots from a local path; a real
deployment points `--checkpoint` at an HF checkpoint on storage every node mounts), starts one
worker per GPU, generates for phases of skewed prompts whose hot tokens drift between phases, and
prints throughput, the worst layer's imbalance and what the coordinator did. Everything here is
the public API: LLM, SamplingParams, LLM.stats().
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from moeray import LLM, SamplingParams
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
    p.add_argument("--requests", type=int, default=256, help="requests per phase")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--phases", type=int, default=3, help="workloads; the hot tokens move between them")
    p.add_argument("--wait-for-gpus-s", type=float, default=1800, help="how long to wait for GPU nodes to join")
    return p.parse_args(argv)


@ray.remote(num_cpus=0)
def _write_random_checkpoint(model_overrides: dict, path: str, seed: int) -> str:
    from moeray.models.tiny import write_tiny_model

    write_tiny_model(path, family="qwen3_moe", seed=seed, **model_overrides)
    return ray.get_runtime_context().get_node_id()


def cluster_is_loopback_only() -> bool:
    """Whether every node listens on 127.0.0.1 only (moeray's local cluster): no node can join it,
    so waiting for GPUs there is waiting forever."""
    return all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes() if n["Alive"])


def wait_for_gpus(count: int, timeout_s: float, can_grow: bool = True, progress_every_s: float = 60.0) -> None:
    """Ask the autoscaler for `count` GPUs and wait until the cluster has them (nodes of a `ray up`
    cluster with min_workers 0 start on demand and take minutes to boot and install), saying what
    it waits for. `can_grow=False` (a local cluster: no autoscaler adds nodes) fails at once."""
    have = ray.cluster_resources().get("GPU", 0)
    if have >= count:
        return
    if not can_grow:
        raise SystemExit(f"this job needs {count} GPUs; the local Ray cluster on this machine has {have:g} and nothing "
                         f"will add more: run it on a `ray up cluster.yaml` cluster, or pass --device cpu")
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * count)
    print(f"waiting up to {timeout_s:g} s for {count} GPUs (the cluster has {have:g}; asked the autoscaler for "
          f"{count} x {{GPU: 1}}; new GPU nodes take minutes to boot)", flush=True)
    start = time.monotonic()
    next_progress = start + progress_every_s
    while (have := ray.cluster_resources().get("GPU", 0)) < count:
        now = time.monotonic()
        if now - start > timeout_s:
            raise SystemExit(f"the cluster has {have:g} GPUs after {timeout_s:g} s, {count} needed: check the "
                             f"autoscaler (`ray status`, `ray monitor cluster.yaml`), or lower --workers")
        if now >= next_progress:
            print(f"  still waiting: {have:g}/{count} GPUs after {now - start:.0f} s", flush=True)
            next_progress = now + progress_every_s
        time.sleep(min(10.0, progress_every_s))  # polling the autoscaler's progress; nothing to wait on instead
    print(f"{have:g} GPUs available after {time.monotonic() - start:.0f} s", flush=True)


def random_checkpoint_on_every_node(model_overrides: dict, path: str, seed: int = 0) -> None:
    """Deterministic weights, so every node's copy is identical."""
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    ray.get([_write_random_checkpoint.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
             .remote(model_overrides, path, seed) for n in nodes])


def main(argv=None) -> dict:
    args = parse_args(argv)
    ensure_ray()
    model = dict(vocab_size=4096, hidden_size=args.hidden, moe_intermediate_size=args.ffn, num_hidden_layers=args.layers,
                 num_experts=args.experts, top_k=args.top_k)
    if args.device == "cuda":
        wait_for_gpus(args.workers, args.wait_for_gpus_s, can_grow=not cluster_is_loopback_only())
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = args.random_checkpoint_dir
        random_checkpoint_on_every_node(model, checkpoint)
    stream = DriftingStream(model["vocab_size"], args.prompt_tokens, phase_steps=args.requests, hot_tokens=8, seed=0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, ignore_eos=True, seed=0)
    generated = 0
    with LLM(checkpoint, num_workers=args.workers, device=args.device,
             dtype="bfloat16" if args.device == "cuda" else "float32",
             redundant_slots_per_worker=args.redundant_slots,
             parallel={"placement_timeout_s": max(120.0, args.wait_for_gpus_s)},
             stats={"snapshot_interval_steps": 8},
             rebalance={"window_steps": 32, "check_interval_steps": 8, "cooldown_s": 2.0, "min_tokens": 0}) as llm:
        for phase in range(args.phases):
            prompts = [stream.next_batch().tolist() for _ in range(args.requests)]  # each phase: new hot tokens
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            generated += tokens
            print(f"phase {phase}: {tokens} tokens in {elapsed:.1f}s ({tokens / elapsed:.0f} tok/s), worst layer "
                  f"imbalance {float(llm.engine.imbalance().max()):.3f}, placement v{llm.placement().version}",
                  flush=True)
        stats = llm.stats()
    print(f"{len(stats['rebalances'])} rebalances; imbalance now mean {stats['imbalance_mean']:.3f}, "
          f"worst {stats['imbalance_worst']:.3f}")
    return {"generated_tokens": generated, "rebalances": len(stats["rebalances"]),
            "imbalance_worst": stats["imbalance_worst"]}


if __name__ == "__main__":
    main()

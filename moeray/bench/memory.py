"""`moeray bench memory`: each worker's resident memory after loading, against what it must hold.

Writes a random checkpoint whose experts alone take `--expert-gb` (default 1.5 GB), starts the
engine on CPU workers, and reads every worker's resident set size (RSS): the growth from before
the worker read anything to after loading, against dense weights + its slots + its KV cache. A
worker that read the whole checkpoint (or kept copies) would show ~W times its share.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

from moeray.bench import standalone, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--expert-gb", type=float, default=1.5, help="size of all experts of the checkpoint")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--family", default="mixtral")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-tokens", type=int, default=4096, help="KV cache tokens per worker")
    p.add_argument("--json", default=None)


def run(args: argparse.Namespace) -> dict:
    from moeray.config import tiny_model_config
    from moeray.llm import LLM
    from moeray.models.random_weights import write_random_checkpoint

    itemsize = 4 if args.dtype == "float32" else 2
    ffn = int(args.expert_gb * 1e9 / (args.layers * args.experts * 3 * args.hidden * itemsize))
    cfg = tiny_model_config(family=args.family, vocab_size=4096, hidden_size=args.hidden, moe_intermediate_size=ffn,
                            num_hidden_layers=args.layers, num_experts=args.experts, top_k=2, dtype=args.dtype,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8)
    with tempfile.TemporaryDirectory(prefix="moeray-memory-") as ckpt:
        t0 = time.perf_counter()
        write_random_checkpoint(cfg, ckpt, seed=0, max_shard_bytes=1 << 30)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with LLM(ckpt, num_workers=args.workers, cache={"kv_tokens_per_worker": args.kv_tokens},
                 rebalance={"enabled": False}) as llm:
            load_s = time.perf_counter() - t0
            import ray

            reports = ray.get([w.memory_report.remote() for w in llm.engine.workers])
            out = llm.generate([[5, 6, 7]])[0].outputs[0].token_ids  # it serves
    rows = []
    for r in reports:
        need = r["dense_bytes"] + r["slot_bytes"] + r["kv_bytes"]
        grown = r["rss_now"] - r["rss_before_load"]
        rows.append({**r, "needed_bytes": need, "rss_growth_bytes": grown, "ratio": grown / need})
        print(f"worker {r['rank']}: RSS grew {grown / 1e9:.3f} GB for dense {r['dense_bytes'] / 1e9:.3f} + slots "
              f"{r['slot_bytes'] / 1e9:.3f} + KV {r['kv_bytes'] / 1e9:.3f} = {need / 1e9:.3f} GB: "
              f"{grown / need:.3f}x", flush=True)
    total_experts = cfg.num_moe_layers * cfg.num_experts * cfg.expert_bytes
    print(f"checkpoint experts {total_experts / 1e9:.2f} GB; written in {write_s:.0f} s, engine up in {load_s:.1f} s; "
          f"generated {len(out)} tokens")
    result = {"command": getattr(args, "command", ""), "machine": platform.node(), "config": cfg.model_dump(),
              "expert_bytes_total": total_experts, "workers": rows, "write_s": write_s, "load_s": load_s}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    standalone("memory", __doc__, add_arguments, run)

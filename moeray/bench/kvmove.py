"""`moeray bench kvmove`: when a sequence changes worker (a scale down, a drained worker), is it
cheaper to move its KV cache or to re-prefill it on the new worker? Issue 11 asks which.

For each context length N: (a) re-prefill: one request of N prompt tokens and max_tokens=1 on a
1-worker engine (the median of --repeats warm runs, end to end through the driver: what a moved
request costs today); (b) move: N x kv_bytes_per_token bytes (the model's K and V of every layer)
copied from one Ray actor to another through the object store (the source's put, the
destination's get and copy into its own buffer; median of --repeats), the path a KV transfer
between CPU workers would take. GPU workers would move KV by NCCL p2p instead (multi-GPU runs wait
for their issue); on one GPU only (a) is measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np

from moeray.bench import standalone, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contexts", default="64,256,1024,2048", help="context lengths (tokens) of the moved sequence")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", default=None, help="a `bench generate` preset instead of the tiny model")
    p.add_argument("--cache-dir", default="/tmp/moeray-bench-models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--machine", default=platform.node())
    p.add_argument("--date", default="")
    p.add_argument("--json", default=None)


class _KVHolder:
    """One end of a KV transfer: owns a buffer the size of the moved cache."""

    def __init__(self, nbytes: int):
        self.buffer = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)

    def send(self):
        import ray

        return [ray.put(self.buffer)]  # boxed: the caller hands the reference on unresolved

    def receive(self, box) -> float:
        import ray

        start = time.perf_counter()
        data = ray.get(box[0])
        np.copyto(self.buffer, data)  # into this worker's own cache (the object store view is read-only)
        return time.perf_counter() - start


def _move_ms(nbytes: int, repeats: int) -> float:
    import ray

    holder = ray.remote(_KVHolder).options(num_cpus=0)
    source, destination = holder.remote(nbytes), holder.remote(nbytes)
    samples = []
    for _ in range(repeats + 1):  # the first round warms the connections
        start = time.perf_counter()
        box = ray.get(source.send.remote())
        ray.get(destination.receive.remote(box))
        samples.append(1e3 * (time.perf_counter() - start))
    for actor in (source, destination):
        ray.kill(actor)
    return statistics.median(samples[1:])


def run(args: argparse.Namespace) -> dict:
    from moeray.generation.sampling import SamplingParams
    from moeray.llm import LLM
    from moeray.models.tiny import write_tiny_model
    from moeray.ray_cluster import ensure_ray

    ensure_ray()
    contexts = [int(c) for c in args.contexts.split(",")]
    with tempfile.TemporaryDirectory(prefix="moeray-bench-kvmove-") as scratch:
        if args.preset:
            from moeray.bench.serve import _preset_checkpoint

            ckpt, model = _preset_checkpoint(args)
        else:
            ckpt, model = write_tiny_model(scratch, max_position_embeddings=max(contexts) + 8)
        rows = []
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        rng = np.random.default_rng(args.seed)
        with LLM(ckpt, num_workers=1, device=args.device, rebalance={"enabled": False},
                 cache={"kv_tokens_per_worker": max(contexts) + 64}) as llm:
            for n in contexts:
                times = []
                for _ in range(args.repeats + 1):
                    prompt = rng.integers(3, model.vocab_size, n).tolist()
                    start = time.perf_counter()
                    llm.generate([prompt], params)
                    times.append(1e3 * (time.perf_counter() - start))
                nbytes = n * model.kv_bytes_per_token
                prefill_ms = statistics.median(times[1:])
                move_ms = _move_ms(nbytes, args.repeats) if args.device == "cpu" else None
                rows.append({"context_tokens": n, "kv_bytes": nbytes, "reprefill_ms": prefill_ms, "move_ms": move_ms,
                             "cheaper": None if move_ms is None else ("move" if move_ms < prefill_ms else "re-prefill")})
    result = {"benchmark": "kvmove", "machine": args.machine, "cpus": os.cpu_count(), "date": args.date,
              "command": getattr(args, "command", "python -m moeray.bench.kvmove"), "device": args.device,
              "model": args.preset or "tiny", "kv_bytes_per_token": model.kv_bytes_per_token, "rows": rows}
    print(f"kvmove: {result['model']} on {args.device}, {model.kv_bytes_per_token} KV bytes per token")
    print(f"{'tokens':>7} {'KV MiB':>8} {'re-prefill ms':>14} {'move ms':>8}  cheaper")
    for r in rows:
        move = "-" if r["move_ms"] is None else f"{r['move_ms']:.2f}"
        print(f"{r['context_tokens']:>7} {r['kv_bytes'] / 2**20:>8.2f} {r['reprefill_ms']:>14.2f} {move:>8}  {r['cheaper']}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    standalone("kvmove", __doc__, add_arguments, run)

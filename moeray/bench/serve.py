"""`moeray bench serve`: the HTTP service (Ray Serve) under concurrent clients, on local CPU workers.

C client threads each send R requests of T tokens back to back (keep-alive sessions) to
POST /v1/forward. Requests join the engine's next step (continuous batching). Reported:
requests/s, tokens/s, latency p50 / p99, and how many requests an engine step carried on average
(requests / engine steps, from /v1/stats).
"""

from __future__ import annotations

import argparse
import platform
import socket
import tempfile
import threading
import time

import numpy as np

from moeray.bench import standalone, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests-per-client", type=int, default=20)
    p.add_argument("--tokens-per-request", type=int, default=16)
    p.add_argument("--machine", default=platform.node())
    p.add_argument("--date", default="")
    p.add_argument("--json", default=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(url: str, clients: int, per_client: int, tokens: int, vocab: int) -> tuple[list[float], float, int]:
    """(latencies in s, wall s, failed requests)."""
    import requests

    latencies: list[float] = []
    failed = [0]
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        rng = np.random.default_rng(i)
        session = requests.Session()
        start.wait()
        for _ in range(per_client):
            ids = rng.integers(0, vocab, tokens).tolist()
            t0 = time.perf_counter()
            try:
                ok = session.post(f"{url}/v1/forward", json={"token_ids": ids}, timeout=120).status_code == 200
            except Exception:  # a refused or dropped connection counts as a failed request
                ok = False
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(dt)
                else:
                    failed[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    return latencies, time.perf_counter() - t0, failed[0]


def run(args: argparse.Namespace) -> dict:
    import requests
    from ray import serve

    from moeray.config import EngineOptions, ParallelConfig, RebalanceConfig
    from moeray.models.tiny import write_tiny_model
    from moeray.ray_cluster import ensure_ray
    from moeray.serving.config import ServeConfig, ServiceConfig
    from moeray.serving.deployment import run_service

    ensure_ray()
    rows = []
    with tempfile.TemporaryDirectory(prefix="moeray-bench-serve-") as ckpt:
        _, model = write_tiny_model(ckpt, num_experts=args.experts, num_hidden_layers=args.layers,
                                    hidden_size=args.hidden, moe_intermediate_size=args.ffn)
        port = _free_port()
        for batch in ["continuous"]:
            config = ServiceConfig(
                checkpoint=ckpt,
                engine=EngineOptions(parallel=ParallelConfig(num_workers=args.workers),
                                     rebalance=RebalanceConfig(enabled=False)),
                serve=ServeConfig(port=port, app_name="moeray-bench"),
            )
            run_service(config, blocking=False)
            url = f"http://127.0.0.1:{port}"
            _load(url, min(4, args.clients), 3, args.tokens_per_request, model.vocab_size)  # warm-up
            before = requests.get(f"{url}/v1/stats", timeout=60).json()
            lat, wall, failed = _load(url, args.clients, args.requests_per_client, args.tokens_per_request, model.vocab_size)
            after = requests.get(f"{url}/v1/stats", timeout=60).json()
            serve.delete(config.serve.app_name)
            steps = after["steps"] - before["steps"]
            done = len(lat)
            rows.append({
                "batching": batch, "requests": done, "failed": failed, "wall_s": wall,
                "requests_per_s": done / wall, "tokens_per_s": done * args.tokens_per_request / wall,
                "latency_p50_ms": float(np.percentile(lat, 50) * 1e3) if lat else float("nan"),
                "latency_p99_ms": float(np.percentile(lat, 99) * 1e3) if lat else float("nan"),
                "engine_steps": steps, "requests_per_step": done / max(steps, 1),
                "largest_step_requests": after["largest_step_requests"],
            })
    serve.shutdown()
    result = {"benchmark": "serve", "machine": args.machine, "date": args.date,
              "command": getattr(args, "command", "python -m moeray.bench.serve"),
              "config": {k: getattr(args, k) for k in ("workers", "experts", "layers", "hidden", "ffn", "clients",
                                                        "requests_per_client", "tokens_per_request")},
              "rows": rows}
    print(f"serve: {args.clients} clients x {args.requests_per_client} requests x {args.tokens_per_request} tokens, "
          f"{args.workers} CPU workers, {args.layers} layers x {args.experts} experts")
    print(f"{'batching':>10} {'req/s':>8} {'tokens/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'req/step':>8} {'failed':>6}")
    for r in rows:
        print(f"{r['batching']:>10} {r['requests_per_s']:>8.1f} {r['tokens_per_s']:>9.0f} {r['latency_p50_ms']:>8.1f} "
              f"{r['latency_p99_ms']:>8.1f} {r['requests_per_step']:>8.2f} {r['failed']:>6}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    standalone("serve", __doc__, add_arguments, run)

"""`moeray bench serve`: the OpenAI-compatible HTTP service under concurrent streaming clients, on
local CPU workers (a tiny random model) or GPU workers (`--device cuda --preset mixtral-4l`: the
Mixtral-shaped random checkpoint of `moeray bench generate`, with the tiny byte-level tokenizer
added so the service streams text).

C clients (threads, one keep-alive connection each) send streaming `POST /v1/completions` back to
back for D seconds: random token-id prompts of P tokens, `max_tokens` M with `ignore_eos` (every
request generates exactly M tokens), `stream_options.include_usage`. Measured on the client, as
vLLM's benchmark_serving does: time to first token (request sent -> first streamed text), inter-token
latency (the gaps between consecutive streamed chunks), time per output token ((end - first) /
(M - 1)), output tokens/s over the whole run. An error is anything but a 200 stream that ends in
`data: [DONE]` with M completion tokens. Requests already started when D ends run to completion.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

from moeray.bench import standalone, write_json
from moeray.bench.http_clients import StreamingClient, free_port, latency_summary, run_for


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=2, help="engine workers (Gloo on CPU, NCCL on GPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", default=None,
                   help="a `bench generate` preset (e.g. mixtral-4l) instead of the tiny model's --experts/--layers/...")
    p.add_argument("--cache-dir", default="/tmp/moeray-bench-models", help="where presets are written")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-tokens", type=int, default=None, help="KV cache tokens per worker (default: the config's)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    p.add_argument("--duration-s", type=float, default=60.0, help="how long clients start new requests")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--machine", default=platform.node())
    p.add_argument("--date", default="")
    p.add_argument("--json", default=None)


def _load(port: int, args: argparse.Namespace, vocab: int, duration_s: float, clients: int) -> dict:
    workers = [StreamingClient(port, i, vocab, args.prompt_tokens, args.max_tokens) for i in range(clients)]
    return latency_summary(workers, run_for(workers, duration_s), args.max_tokens)


def run(args: argparse.Namespace) -> dict:
    from ray import serve

    from moeray.config import CacheConfig, EngineOptions, ParallelConfig, RebalanceConfig
    from moeray.models.tiny import write_tiny_model
    from moeray.ray_cluster import ensure_ray
    from moeray.serving.config import ServeConfig, ServiceConfig
    from moeray.serving.deployment import run_service

    ensure_ray()
    with tempfile.TemporaryDirectory(prefix="moeray-bench-serve-") as scratch:
        if args.preset:
            ckpt, model = _preset_checkpoint(args)
        else:
            ckpt = scratch
            _, model = write_tiny_model(ckpt, num_experts=args.experts, num_hidden_layers=args.layers,
                                        hidden_size=args.hidden, moe_intermediate_size=args.ffn)
        cache = {} if args.kv_tokens is None else {"cache": CacheConfig(kv_tokens_per_worker=args.kv_tokens)}
        config = ServiceConfig(
            checkpoint=ckpt,
            engine=EngineOptions(parallel=ParallelConfig(num_workers=args.workers, device=args.device),
                                 rebalance=RebalanceConfig(enabled=False), **cache),
            serve=ServeConfig(port=free_port(), app_name="moeray-bench", max_ongoing_requests=max(64, 2 * args.clients)),
        )
        run_service(config, blocking=False)
        try:
            _load(config.serve.port, args, model.vocab_size, 5.0, min(4, args.clients))  # warm-up
            row = _load(config.serve.port, args, model.vocab_size, args.duration_s, args.clients)
        finally:
            serve.delete(config.serve.app_name)
            serve.shutdown()
    result = {"benchmark": "serve", "machine": args.machine, "cpus": os.cpu_count(), "date": args.date,
              "command": getattr(args, "command", "python -m moeray.bench.serve"),
              "config": {k: getattr(args, k) for k in ("workers", "device", "preset", "experts", "layers", "hidden", "ffn",
                                                        "clients", "duration_s", "prompt_tokens", "max_tokens",
                                                        "kv_tokens")},
              "rows": [row]}
    shape = args.preset or f"{args.layers} layers x {args.experts} experts"
    print(f"serve: {args.clients} streaming clients for {args.duration_s:g} s, prompts of {args.prompt_tokens} tokens, "
          f"{args.max_tokens} generated each; {args.workers} {args.device} workers, {shape}")
    print(f"{'requests':>8} {'errors':>6} {'tok/s':>7} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} "
          f"{'TPOT p50':>9} {'p99':>7}  (ms)")
    print(f"{row['requests']:>8} {row['errors']:>6} {row['output_tokens_per_s']:>7.0f} {row['ttft_p50_ms']:>9.1f} "
          f"{row['ttft_p99_ms']:>7.1f} {row['itl_p50_ms']:>8.1f} {row['itl_p99_ms']:>7.1f} {row['tpot_p50_ms']:>9.1f} "
          f"{row['tpot_p99_ms']:>7.1f}")
    if row["errors"]:
        print("errors, e.g.:", *row["error_examples"], sep="\n  ")
    write_json(args.json, result)
    return result


def _preset_checkpoint(args: argparse.Namespace):
    """(directory, ModelConfig) of a `bench generate` preset, written once with random weights,
    plus the tiny tokenizer of its vocabulary (random weights have no tokenizer of their own)."""
    from pathlib import Path

    from moeray.bench.generate import model_dir
    from moeray.generation.tokenizer import TOKENIZER_FILE, write_tiny_tokenizer
    from moeray.models.checkpoint import check_checkpoint

    directory = model_dir(argparse.Namespace(model=None, preset=args.preset, cache_dir=args.cache_dir, seed=args.seed,
                                             device=args.device))
    model = check_checkpoint(directory)
    if not (Path(directory) / TOKENIZER_FILE).exists():
        write_tiny_tokenizer(directory, model.vocab_size)
    return directory, model


if __name__ == "__main__":
    standalone("serve", __doc__, add_arguments, run)

"""`moeray bench serve`: the OpenAI-compatible HTTP service under concurrent streaming clients, on
local CPU workers.

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
import http.client
import json
import os
import platform
import socket
import tempfile
import threading
import time

import numpy as np

from moeray.bench import standalone, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=2, help="CPU engine workers (Gloo)")
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Client:
    """One streaming client: its own connection, its own samples."""

    def __init__(self, port: int, index: int, args: argparse.Namespace, vocab: int):
        self.port, self.args = port, args
        self.rng = np.random.default_rng(index)
        self.vocab = vocab
        self.conn: http.client.HTTPConnection | None = None
        self.ttft_s: list[float] = []
        self.itl_s: list[float] = []
        self.tpot_s: list[float] = []
        self.tokens = 0
        self.errors: list[str] = []

    def run(self, start: threading.Barrier, deadline: list[float]) -> None:
        start.wait()
        while time.perf_counter() < deadline[0]:
            try:
                self._one_request()
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported, none hidden
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self._reconnect()

    def _reconnect(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def _one_request(self) -> None:
        if self.conn is None:
            self._reconnect()
        prompt = self.rng.integers(3, self.vocab, self.args.prompt_tokens).tolist()
        body = json.dumps({"prompt": prompt, "max_tokens": self.args.max_tokens, "ignore_eos": True,
                           "temperature": 1.0, "stream": True, "stream_options": {"include_usage": True}})
        sent = time.perf_counter()
        self.conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        chunk_times, usage, done = [], None, False
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if line == b"data: [DONE]":
                done = True
                continue
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']['message']}")
            if event["choices"] and event["choices"][0]["text"]:
                chunk_times.append(time.perf_counter())
            if event.get("usage"):
                usage = event["usage"]
        resp.read()  # the end of the chunked body: the connection is reused
        if not done or usage is None or usage["completion_tokens"] != self.args.max_tokens or not chunk_times:
            raise RuntimeError(f"incomplete stream: done={done} usage={usage} chunks={len(chunk_times)}")
        self.ttft_s.append(chunk_times[0] - sent)
        self.itl_s.extend(np.diff(chunk_times).tolist())
        self.tpot_s.append((chunk_times[-1] - chunk_times[0]) / max(self.args.max_tokens - 1, 1))
        self.tokens += usage["completion_tokens"]


def _load(port: int, args: argparse.Namespace, vocab: int, duration_s: float, clients: int) -> dict:
    workers = [_Client(port, i, args, vocab) for i in range(clients)]
    start = threading.Barrier(clients + 1)
    deadline = [float("inf")]
    threads = [threading.Thread(target=c.run, args=(start, deadline), daemon=True) for c in workers]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    deadline[0] = t0 + duration_s
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    ttft = [x for c in workers for x in c.ttft_s]
    itl = [x for c in workers for x in c.itl_s]
    tpot = [x for c in workers for x in c.tpot_s]
    errors = [e for c in workers for e in c.errors]

    def pct(values, q):
        return float(np.percentile(values, q) * 1e3) if values else float("nan")

    return {"clients": clients, "wall_s": wall, "requests": len(ttft), "errors": len(errors),
            "error_examples": errors[:5], "output_tokens": sum(c.tokens for c in workers),
            "output_tokens_per_s": sum(c.tokens for c in workers) / wall, "requests_per_s": len(ttft) / wall,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(itl, 50),
            "itl_p99_ms": pct(itl, 99), "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99)}


def run(args: argparse.Namespace) -> dict:
    from ray import serve

    from moeray.config import EngineOptions, ParallelConfig, RebalanceConfig
    from moeray.models.tiny import write_tiny_model
    from moeray.ray_cluster import ensure_ray
    from moeray.serving.config import ServeConfig, ServiceConfig
    from moeray.serving.deployment import run_service

    ensure_ray()
    with tempfile.TemporaryDirectory(prefix="moeray-bench-serve-") as ckpt:
        _, model = write_tiny_model(ckpt, num_experts=args.experts, num_hidden_layers=args.layers,
                                    hidden_size=args.hidden, moe_intermediate_size=args.ffn)
        config = ServiceConfig(
            checkpoint=ckpt,
            engine=EngineOptions(parallel=ParallelConfig(num_workers=args.workers),
                                 rebalance=RebalanceConfig(enabled=False)),
            serve=ServeConfig(port=_free_port(), app_name="moeray-bench", max_ongoing_requests=max(64, 2 * args.clients)),
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
              "config": {k: getattr(args, k) for k in ("workers", "experts", "layers", "hidden", "ffn", "clients",
                                                        "duration_s", "prompt_tokens", "max_tokens")},
              "rows": [row]}
    print(f"serve: {args.clients} streaming clients for {args.duration_s:g} s, prompts of {args.prompt_tokens} tokens, "
          f"{args.max_tokens} generated each; {args.workers} CPU workers, {args.layers} layers x {args.experts} experts")
    print(f"{'requests':>8} {'errors':>6} {'tok/s':>7} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} "
          f"{'TPOT p50':>9} {'p99':>7}  (ms)")
    print(f"{row['requests']:>8} {row['errors']:>6} {row['output_tokens_per_s']:>7.0f} {row['ttft_p50_ms']:>9.1f} "
          f"{row['ttft_p99_ms']:>7.1f} {row['itl_p50_ms']:>8.1f} {row['itl_p99_ms']:>7.1f} {row['tpot_p50_ms']:>9.1f} "
          f"{row['tpot_p99_ms']:>7.1f}")
    if row["errors"]:
        print("errors, e.g.:", *row["error_examples"], sep="\n  ")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    standalone("serve", __doc__, add_arguments, run)

"""Streaming HTTP clients for the service benchmarks (`bench serve`, `bench chaos`).

Each `StreamingClient` is one thread on one keep-alive connection that sends streaming
`POST /v1/completions` back to back until a stop event is set: P prompt token ids, `max_tokens` M
with `ignore_eos` (so every request generates exactly M tokens), `stream_options.include_usage`.
It never retries: a failed request is recorded and the next one is a new request. A request is ok
only as a 200 stream that ends in `data: [DONE]` with M completion tokens.

Times are wall-clock (`time.time()`), so a chunk, a kill and the server's own event times (same
machine) are on one clock; a request's start and chunk times are all that latency figures need.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(port: int, method: str, path: str, body: dict | None = None, timeout_s: float = 120.0):
    """(status, parsed JSON or text) of one call on its own connection; (None, error) if it failed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(method, path, None if body is None else json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw[:300].decode(errors="replace")
    except Exception as exc:  # noqa: BLE001 - a refused / timed-out call is a result here
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


@dataclass
class RequestRecord:
    """One request as the client saw it: sent, every streamed text chunk, the end."""

    sent_s: float
    chunk_times_s: list[float] = field(default_factory=list)
    ended_s: float = 0.0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class StreamingClient:
    """One streaming client: its own connection, its own records."""

    def __init__(self, port: int, seed: int, vocab: int, prompt_tokens: int, max_tokens: int,
                 temperature: float = 1.0, prompt_sampler=None, timeout_s: float = 120.0):
        """`prompt_sampler(rng, n)`: the prompt's token ids (default: uniform over [3, vocab), above
        the tiny tokenizer's special ids)."""
        self.port, self.vocab = port, vocab
        self.prompt_tokens, self.max_tokens, self.temperature = prompt_tokens, max_tokens, temperature
        self.prompt_sampler = prompt_sampler or (lambda rng, n: rng.integers(3, vocab, n))
        self.timeout_s = timeout_s
        self.rng = np.random.default_rng(seed)
        self.conn: http.client.HTTPConnection | None = None
        self.records: list[RequestRecord] = []

    def run(self, start: threading.Barrier, stop: threading.Event) -> None:
        start.wait()
        while not stop.is_set():
            record = RequestRecord(sent_s=time.time())
            self.records.append(record)
            try:
                self._one_request(record)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported, none hidden
                record.error = f"{type(exc).__name__}: {exc}"
                self._reconnect()  # the connection may be mid-stream: never reuse it
            record.ended_s = time.time()

    def _reconnect(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)

    def _one_request(self, record: RequestRecord) -> None:
        if self.conn is None:
            self._reconnect()
        prompt = [int(t) for t in self.prompt_sampler(self.rng, self.prompt_tokens)]
        body = json.dumps({"prompt": prompt, "max_tokens": self.max_tokens, "ignore_eos": True,
                           "temperature": self.temperature, "stream": True, "stream_options": {"include_usage": True}})
        self.conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        usage, done = None, False
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
                record.chunk_times_s.append(time.time())
            if event.get("usage"):
                usage = event["usage"]
        resp.read()  # the end of the chunked body: the connection is reused
        if not done or usage is None or usage["completion_tokens"] != self.max_tokens or not record.chunk_times_s:
            raise RuntimeError(f"incomplete stream: done={done} usage={usage} chunks={len(record.chunk_times_s)}")
        record.completion_tokens = usage["completion_tokens"]


def start_clients(clients: list[StreamingClient]) -> tuple[list[threading.Thread], threading.Event, float]:
    """Start every client at once; returns (threads, stop event, start time). Set the event to
    make them stop starting requests (those running finish), then join the threads."""
    start, stop = threading.Barrier(len(clients) + 1), threading.Event()
    threads = [threading.Thread(target=c.run, args=(start, stop), daemon=True, name=f"client-{i}")
               for i, c in enumerate(clients)]
    for th in threads:
        th.start()
    start.wait()
    return threads, stop, time.time()


def run_for(clients: list[StreamingClient], duration_s: float) -> float:
    """Run the clients for `duration_s` (requests running then finish); returns the wall time."""
    threads, stop, t0 = start_clients(clients)
    timer = threading.Timer(duration_s, stop.set)
    timer.start()
    for th in threads:
        th.join()
    return time.time() - t0


def latency_summary(clients: list[StreamingClient], wall_s: float, max_tokens: int) -> dict:
    """vLLM benchmark_serving's client-side figures over every ok request: TTFT (sent -> first
    text), ITL (gaps between consecutive chunks), TPOT ((last - first) / (M - 1)), tokens/s."""
    records = [r for c in clients for r in c.records]
    ok = [r for r in records if r.ok]
    errors = [r.error for r in records if not r.ok]
    ttft = [r.chunk_times_s[0] - r.sent_s for r in ok]
    itl = [x for r in ok for x in np.diff(r.chunk_times_s).tolist()]
    tpot = [(r.chunk_times_s[-1] - r.chunk_times_s[0]) / max(max_tokens - 1, 1) for r in ok]
    tokens = sum(r.completion_tokens for r in ok)

    def pct(values, q):
        return float(np.percentile(values, q) * 1e3) if values else float("nan")

    return {"clients": len(clients), "wall_s": wall_s, "requests": len(ok), "errors": len(errors),
            "error_examples": errors[:5], "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall_s, "requests_per_s": len(ok) / wall_s,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(itl, 50),
            "itl_p99_ms": pct(itl, 99), "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99)}

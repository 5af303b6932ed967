"""Talk to a running `moeray serve` (see examples/service.yaml): one forward, concurrent requests,
an invalid one (answered 4xx, naming the bad value), then the service's stats.

    python examples/http_client.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor

import requests


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)

    one = requests.post(f"{args.url}/v1/forward", json={"token_ids": [1, 2, 3], "top_logprobs": 2}, timeout=60)
    print("forward:", one.status_code, json.dumps(one.json()))

    def call(i: int) -> int:
        ids = [(i * 7 + j) % 256 for j in range(1 + i % 16)]
        return requests.post(f"{args.url}/v1/forward", json={"token_ids": ids}, timeout=60).status_code

    with ThreadPoolExecutor(args.concurrency) as pool:
        codes = list(pool.map(call, range(4 * args.concurrency)))
    print(f"{len(codes)} concurrent requests:", {c: codes.count(c) for c in set(codes)})

    bad = requests.post(f"{args.url}/v1/forward", json={"token_ids": [1, 10**6]}, timeout=60)
    print("invalid:", bad.status_code, bad.json()["detail"])

    stats = requests.get(f"{args.url}/v1/stats", timeout=60).json()
    print("stats:", {k: stats[k] for k in ("steps", "batches", "batched_requests", "largest_batch", "placement_version")})


if __name__ == "__main__":
    main()

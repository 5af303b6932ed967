"""`moeray bench exchange`: our NCCL all-to-all (NcclGroup.all_to_all) vs raw
torch.distributed.all_to_all_single, one process per GPU, message sizes 64 KiB .. 512 MiB.

Legend: W ranks (GPUs), B bytes each rank sends in one all-to-all (its whole input), n = B / 2 bf16
elements. Splits are even (B / W to each rank, itself included), identical for both peers.
Bus bandwidth (nccl-tests convention for all-to-all): busbw = B / t * (W - 1) / W.
Roofline: NVLink 4 on H100/H200 SXM, 18 links x 25 GB/s = 450 GB/s per direction per GPU
(--link-gbps); the fraction is busbw / that.

Timing: each point is the median over `--reps` windows of `iters` back-to-back ops between CUDA
events (ops enqueued back to back, as a serving step enqueues them), ours and raw interleaved.
"Small" also times our dispatch path as a layer runs it: counts all-to-all, the split-size host
sync (.tolist()), then the rows all-to-all (64 tokens x 4096 bf16 by default).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from moeray.bench import standalone, write_json

SIZES = [64 << 10, 256 << 10, 512 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 512 << 20]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--small-tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--link-gbps", type=float, default=450.0)
    p.add_argument("--date", default="")
    p.add_argument("--json", default="docs/benchmarks/exchange.json")


def _time(fn, iters: int) -> float:
    """Seconds per op over `iters` back-to-back launches (stream-ordered, one sync at the end)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def _rank(group, rank: int, sizes: list[int], reps: int, small_tokens: int, hidden: int) -> list[dict]:
    import torch.distributed as dist

    from moeray.bench.gpu_ranks import raw_process_group

    W = group.world_size
    raw = raw_process_group(group, rank, W)
    rows = []
    for B in sizes:
        n = B // 2
        x_n = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        y_ours, y_raw = torch.empty_like(x_n), torch.empty_like(x_n)
        splits = [n // W] * W
        splits[-1] += n - sum(splits)
        ours = lambda: group.all_to_all(y_ours, x_n, splits, splits)  # noqa: E731
        peer = lambda: dist.all_to_all_single(y_raw, x_n, splits, splits, group=raw)  # noqa: E731
        iters = max(10, min(200, (4 << 30) // max(B, 1) // 8))
        for f in (ours, peer):
            _time(f, 3)  # warm-up (first use builds NCCL channels for the size)
        t_ours, t_raw = [], []
        for _ in range(reps):
            group.barrier()
            t_ours.append(_time(ours, iters))
            group.barrier()
            t_raw.append(_time(peer, iters))
        torch.testing.assert_close(y_ours, y_raw)  # same data moved
        rows.append({"bytes": B, "ours_s": statistics.median(t_ours), "raw_s": statistics.median(t_raw), "iters": iters})
        del x_n, y_ours, y_raw
    # Our dispatch path for a small layer: counts exchange + host sync + rows exchange.
    S_w = 8
    x_TD = torch.randn(small_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    count_WS = torch.full((W, S_w), small_tokens // (W * S_w), device="cuda", dtype=torch.int64)

    def dispatch_path():
        recv_WS = torch.empty_like(count_WS)
        group.all_to_all(recv_WS, count_WS)
        send, recv = count_WS.sum(1).tolist(), recv_WS.sum(1).tolist()  # host sync
        out = x_TD.new_empty((sum(recv), hidden))
        group.all_to_all(out, x_TD[: sum(send)], recv, send)

    _time(dispatch_path, 5)
    path = []
    for _ in range(reps):
        group.barrier()
        path.append(_time(dispatch_path, 100))
    return [{"rows": rows, "dispatch_path_s": statistics.median(path), "device": torch.cuda.get_device_name()}]


def run(args: argparse.Namespace) -> dict:
    from moeray.bench.gpu_ranks import run_on_gpus

    if torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"bench exchange needs {args.gpus} GPUs, {torch.cuda.device_count()} visible")
    small = args.small_tokens * args.hidden * 2
    sizes = sorted(set(SIZES + [small]))
    per_rank = run_on_gpus(args.gpus, _rank, (sizes, args.reps, args.small_tokens, args.hidden), timeout_s=120)
    W = args.gpus
    table = []
    for i, B in enumerate(sizes):
        t_ours = max(r[0]["rows"][i]["ours_s"] for r in per_rank)  # the slowest rank bounds the op
        t_raw = max(r[0]["rows"][i]["raw_s"] for r in per_rank)
        bus = lambda t: B / t * (W - 1) / W / 1e9  # noqa: E731
        table.append({"bytes": B, "ours_us": t_ours * 1e6, "raw_us": t_raw * 1e6, "ours_busbw_gbps": bus(t_ours),
                      "raw_busbw_gbps": bus(t_raw), "ours_over_raw_bw": t_raw / t_ours,
                      "ours_roofline_frac": bus(t_ours) / args.link_gbps, "small": B == small})
    path_us = max(r[0]["dispatch_path_s"] for r in per_rank) * 1e6
    result = {"benchmark": "exchange", "device": per_rank[0][0]["device"], "gpus": W, "date": args.date,
              "command": getattr(args, "command", "python -m moeray.bench.exchange"), "link_gbps": args.link_gbps,
              "rows": table, "small_tokens": args.small_tokens, "hidden": args.hidden, "dispatch_path_us": path_us,
              "targets": {"bw_ratio_at_ge_64MiB": 0.95, "small_time_ratio_max": 1.2}}
    big = [r for r in table if r["bytes"] >= 64 << 20]
    sm = next(r for r in table if r["small"])
    result["verdict"] = {"min_bw_ratio_ge_64MiB": min(r["ours_over_raw_bw"] for r in big),
                         "small_time_ratio": sm["ours_us"] / sm["raw_us"]}
    print(f"exchange on {W} x {result['device']}: ours = NcclGroup.all_to_all, raw = dist.all_to_all_single")
    print(f"{'size':>10} {'ours us':>10} {'raw us':>10} {'ours GB/s':>10} {'raw GB/s':>10} {'bw ratio':>9} {'roofline':>9}")
    for r in table:
        size = f"{r['bytes'] >> 20} MiB" if r["bytes"] >= 1 << 20 else f"{r['bytes'] >> 10} KiB"
        print(f"{size:>10} {r['ours_us']:>10.1f} {r['raw_us']:>10.1f} {r['ours_busbw_gbps']:>10.1f} "
              f"{r['raw_busbw_gbps']:>10.1f} {r['ours_over_raw_bw']:>9.3f} {r['ours_roofline_frac']:>9.2f}")
    print(f"dispatch path ({args.small_tokens} tokens x {args.hidden}: counts a2a + host sync + rows a2a): {path_us:.1f} us")
    print(f"verdict: min bw ratio >= 64 MiB {result['verdict']['min_bw_ratio_ge_64MiB']:.3f} (target >= 0.95); "
          f"small time ratio {result['verdict']['small_time_ratio']:.3f} (target <= 1.2)")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    standalone("exchange", __doc__, add_arguments, run)

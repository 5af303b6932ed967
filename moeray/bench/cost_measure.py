"""The timing of `moeray bench cost` (moeray/bench/cost.py): kernel launches, even all-to-alls and
layer steps on Gloo ranks, and what else ran on the machine meanwhile.

Legend (docs/architecture.md): T tokens, D hidden, F expert FFN width, S slots (S_w per worker),
W workers (ranks), M rows a rank received, X any number of rows.

Timing: CPU: one torch thread per process (--threads); every kernel sample after a read of a
--flush-mib buffer (weights come from DRAM, as in a step of a model larger than the cache); median
of --reps samples. GPU: triton.testing.do_bench (events, a warm-up, the median; it clears L2 between
runs), after a warm-up of the largest case so clocks are up and the kernels compiled. Exchanges:
median of --reps windows, each a barrier then back-to-back calls, each call into a freshly
allocated output as the dispatcher's (a reused one stays cached and is ~1.8x faster at 2 MiB).
Layer steps: per iteration the slowest rank after a barrier, median over --iters.
Others' load: this machine may run other processes; each timed window reports the CPU seconds
that were not ours (/proc/stat busy time minus our processes' own), as a share of the cores.
"""

from __future__ import annotations

import os
import statistics
import time

HOST_PHASES = ("entry gather", "sort+gather", "arrange", "weighted combine", "token sum")
EXCHANGE_PHASES = ("counts exchange+sync", "rows exchange", "exchange back")


# ---- load accounting --------------------------------------------------------------------------------


def machine_busy_s() -> float | None:
    """CPU seconds every core of the machine spent busy since boot (/proc/stat), None off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def window_start() -> tuple:
    return time.perf_counter(), machine_busy_s(), time.process_time()


def window_end(start: tuple) -> dict:
    """Wall, machine busy and this process's CPU seconds since `start` (window_start)."""
    wall, busy, own = time.perf_counter(), machine_busy_s(), time.process_time()
    return {"wall_s": wall - start[0], "busy_s": None if busy is None else busy - start[1], "own_cpu_s": own - start[2]}


def others_share(windows: list[dict], cores: int) -> float | None:
    """Share of the cores used by other processes during windows taken at once by our processes."""
    if not windows or windows[0]["busy_s"] is None:
        return None
    others = windows[0]["busy_s"] - sum(w["own_cpu_s"] for w in windows)
    return max(0.0, others) / (windows[0]["wall_s"] * cores)


# ---- kernel launches ----------------------------------------------------------------------------------


class Timer:
    """Median seconds of one call: CPU after a cache flush each sample, GPU via do_bench."""

    def __init__(self, device: str, reps: int, flush_mib: int):
        import torch

        self.device, self.reps = device, reps
        self.flush = torch.empty(flush_mib << 18, dtype=torch.float32) if device == "cpu" and flush_mib > 0 else None

    def __call__(self, fn) -> float:
        import torch

        if self.device == "cuda":
            try:
                from triton.testing import do_bench
            except ImportError:
                do_bench = None
            if do_bench is not None:
                return do_bench(fn, warmup=25, rep=max(50, 10 * self.reps), return_mode="median") * 1e-3
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            samples = []
            for _ in range(max(self.reps, 20)):
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) * 1e-3)
            return statistics.median(samples)
        for _ in range(2):
            fn()
        samples = []
        for _ in range(self.reps):
            if self.flush is not None:
                self.flush.sum()  # read: evicts the caches without dirty lines to write back
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)


def measure_kernel_cases(cases, hidden: int, ffn: int, device: str, dtype, timer: Timer, seed: int) -> list[dict]:
    """Each (name, rows_S, columns_S) timed as one expert_mlp launch (impl auto)."""
    import torch

    from moeray.kernels.select import choose_impl, expert_mlp

    S = len(cases[0][1])
    g = torch.Generator(device=device).manual_seed(seed)
    w13_SHD = torch.randn(S, 2 * ffn, hidden, device=device, dtype=dtype, generator=g) / hidden**0.5
    w2_SDF = torch.randn(S, hidden, ffn, device=device, dtype=dtype, generator=g) / ffn**0.5
    max_rows = max(sum(rows) for _, rows, _ in cases)
    x_XD = torch.randn(max(max_rows, 1), hidden, device=device, dtype=dtype, generator=g)
    if device == "cuda":  # clocks up and the kernels compiled before the first timed case
        biggest = torch.tensor(max(cases, key=lambda c: sum(c[1]))[1], dtype=torch.int64, device=device)
        offsets = torch.cat([biggest.new_zeros(1), torch.cumsum(biggest, 0)])
        until = time.perf_counter() + 1.0
        while time.perf_counter() < until:
            expert_mlp(x_XD[: int(offsets[-1])], w13_SHD, w2_SDF, offsets, None, "auto")
            torch.cuda.synchronize()
    out = []
    for name, rows, cols in cases:
        count_S = torch.tensor(rows, dtype=torch.int64, device=device)
        offsets_S1 = torch.cat([count_S.new_zeros(1), torch.cumsum(count_S, 0)])
        x_MD = x_XD[: sum(rows)]
        width_S = None if all(c == ffn for c in cols) else torch.tensor(cols, dtype=torch.int64, device=device)
        seconds = timer(lambda: expert_mlp(x_MD, w13_SHD, w2_SDF, offsets_S1, None, "auto", width_S))
        impl = choose_impl(x_MD, S, sum(rows), hidden, ffn)
        out.append({"name": name, "rows_S": list(map(int, rows)), "width_S": [c / ffn for c in cols],
                    "rows": int(sum(rows)), "touched": int(sum(r > 0 for r in rows)), "impl": impl,
                    "measured_s": seconds})
    return out


# ---- ranks: even exchanges, then layer steps ---------------------------------------------------------


class HostPhases:
    """AllToAllDispatcher.timer on CPU: host seconds between the dispatcher's phase marks."""

    def __init__(self):
        self.last, self.phases = time.perf_counter(), {}

    def start(self) -> None:
        self.last, self.phases = time.perf_counter(), {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now


def _exchanges(group, sizes: list[int], reps: int) -> list[float]:
    """Seconds per even all-to-all of each size (bytes per rank), median of `reps` windows."""
    import torch

    W = group.world_size
    out = []
    for nbytes in sizes:
        n = nbytes // 4
        x_n = torch.randn(n)
        splits = [n // W] * W
        splits[-1] += n - sum(splits)
        iters = max(3, min(50, (8 << 20) // nbytes))
        for _ in range(3):
            group.all_to_all(x_n.new_empty(n), x_n, splits, splits)
        windows = []
        for _ in range(reps):
            group.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                group.all_to_all(x_n.new_empty(n), x_n, splits, splits)  # a fresh output, as the dispatcher's
            windows.append((time.perf_counter() - start) / iters)
        out.append(statistics.median(windows))
    return out


def _layer_steps(group, rank: int, cfg: dict, cases: list) -> list[dict]:
    """Each case's layer step on this rank, per iteration: (step, dispatch, compute, combine, host,
    then each of EXCHANGE_PHASES) seconds, the phases' medians, and the load window of the timing."""
    import torch

    from moeray.comm.dispatcher import AllToAllDispatcher
    from moeray.kernels.select import expert_mlp

    D, F = cfg["hidden"], cfg["ffn"]
    dtype = getattr(torch, cfg["dtype"])
    g = torch.Generator().manual_seed(100 + rank)
    max_spw = max(c["spw"] for c in cases)
    w13_SHD = torch.randn(max_spw, 2 * F, D, generator=g, dtype=dtype) / D**0.5
    w2_SDF = torch.randn(max_spw, D, F, generator=g, dtype=dtype) / F**0.5
    x_TD = torch.randn(max(c["tokens"] for c in cases), D, generator=g, dtype=dtype)
    out = []
    for case in cases:
        spw, T = case["spw"], case["tokens"]
        dispatcher = AllToAllDispatcher(group, spw)
        token_X, slot_X = (torch.as_tensor(a, dtype=torch.int64) for a in case["entries"][rank])
        slot_X1 = slot_X[:, None]
        weights_X1 = torch.full((len(token_X), 1), 1.0 / cfg["top_k"], dtype=dtype)
        columns_S = torch.as_tensor(case["columns_WS"][rank], dtype=torch.int64)
        width_S = None if bool((columns_S == F).all()) else columns_S
        w13, w2 = w13_SHD[:spw], w2_SDF[:spw]
        timer = dispatcher.timer = HostPhases()

        def step():
            marks = [time.perf_counter()]
            timer.start()
            rows_XD = x_TD.index_select(0, token_X)
            timer.mark("entry gather")
            dispatched = dispatcher.dispatch(rows_XD, slot_X1)
            marks.append(time.perf_counter())
            y_MD = expert_mlp(dispatched.tokens_MD, w13, w2, dispatched.slot_offsets_S1, dispatched.order_M, "auto", width_S)
            marks.append(time.perf_counter())
            timer.mark("expert_mlp")
            back_XD = dispatcher.combine_weighted(y_MD, dispatched, weights_X1)
            timer.mark("weighted combine")
            torch.zeros((T, D), dtype=dtype).index_add_(0, token_X, back_XD)
            timer.mark("token sum")
            marks.append(time.perf_counter())
            return marks

        for _ in range(2):
            group.barrier()
            step()
        group.barrier()
        window = window_start()
        samples, phases = [], []
        for _ in range(cfg["iters"]):
            group.barrier()
            m = step()
            p = dict(timer.phases)
            samples.append((m[3] - m[0], m[1] - m[0], m[2] - m[1], m[3] - m[2],
                            sum(p.get(k, 0.0) for k in HOST_PHASES), *(p.get(k, 0.0) for k in EXCHANGE_PHASES)))
            phases.append(p)
        group.barrier()
        out.append({"samples": samples, "phases": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
                    "window": window_end(window)})
    return out


def rank_main(group, rank: int, cfg: dict, sizes: list[int], cases: list) -> dict:
    """One rank: the even exchanges of `sizes` (their load window), then the layer `cases`."""
    import torch

    torch.set_num_threads(cfg["threads"])
    result = {}
    if sizes:
        group.barrier()
        window = window_start()
        result["exchange_s"] = _exchanges(group, sizes, cfg["reps"])
        group.barrier()
        result["exchange_window"] = window_end(window)
    result["layer"] = _layer_steps(group, rank, cfg, cases) if cases else []
    return result


def run_on_ranks(num_workers: int, cfg: dict, sizes: list[int], cases: list) -> list[dict]:
    from moeray.comm.local_ranks import run_ranks

    return run_ranks(num_workers, rank_main, (cfg, sizes, cases), timeout_s=120, wait_s=900,
                     preload=("moeray.kernels.select", "moeray.comm.dispatcher", "moeray.bench.cost_measure"))


def summarize_steps(per_rank: list[dict], index: int, cores: int) -> dict:
    """Case `index` of every rank's layer steps, medians over iterations of the slowest rank of each
    phase. A rank's exchange includes waiting for its peers (which the slowest rank's compute and
    host already count): each exchange is taken from the rank that waited least at it, then summed.
    `measured_rank_step_s`: each rank's median step; the slowest rank per iteration (`measured_s`)
    is above the slowest of these by what per-iteration stragglers add."""
    import numpy as np

    samples = np.array([r["layer"][index]["samples"] for r in per_rank])  # [W, iters, 5 + exchanges]
    slowest = samples.max(axis=0)  # [iters, ...]
    median = lambda a: float(np.median(a))  # noqa: E731
    return {"measured_s": median(slowest[:, 0]), "measured_compute_s": median(slowest[:, 2]),
            "measured_rest_s": median(slowest[:, 0] - slowest[:, 2]),
            "measured_dispatch_s": median(slowest[:, 1]), "measured_combine_s": median(slowest[:, 3]),
            "measured_host_s": median(slowest[:, 4]),
            "measured_exchange_s": median(samples[:, :, 5:].min(axis=0).sum(axis=-1)),
            "measured_rank_step_s": np.median(samples[:, :, 0], axis=1).tolist(),
            "measured_rank_compute_s": np.median(samples[:, :, 2], axis=1).tolist(),
            "measured_phases_s_by_rank": [r["layer"][index]["phases"] for r in per_rank],
            "others_cpu_share": others_share([r["layer"][index]["window"] for r in per_rank], cores)}

"""The rates a host tier decides by (issue 13), measured on this machine for one model's expert
shape: the host's time for one expert across row counts, the pinned host-to-device copy, the
device kernel, and how far fetches and host compute overlap (placement.tiering.TierRates).
Measured once per worker at set-up, alone; HostSlots' calibration corrects the host's part from
the steps that run it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from moeray.kernels import expert_mlp
from moeray.kernels.reference import swiglu
from placement.tiering import TierRates


def _median_s(fn, reps: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


HOST_CURVE_ROWS = (1, 4, 16, 64, 256, 1024)  # decode to prefill row counts of one expert


def measure_rates(hidden: int, ffn: int, dtype: torch.dtype, device: torch.device, reps: int = 3,
                  curve_rows: tuple = HOST_CURVE_ROWS) -> TierRates:
    """TierRates of this machine for experts of this shape: the host's time for one expert at each
    of `curve_rows` rows (with the current torch threads, over distinct experts of >= 256 MiB in all,
    so the weights come from memory as in a step and not from the CPU's cache), the pinned
    host-to-device copy of one expert, the device kernel (16 and 272 rows of one slot), and the
    overlap of fetches and host compute. About a second for a Mixtral-sized expert (plus, on a GPU,
    the first compile of the expert kernel's tiles)."""
    gen = torch.Generator().manual_seed(0)
    w13_HD = (torch.randn(2 * ffn, hidden, generator=gen) * 0.02).to(dtype)
    w2_DF = (torch.randn(hidden, ffn, generator=gen) * 0.02).to(dtype)
    x_RD = torch.randn(max(curve_rows), hidden, generator=gen).to(dtype)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    expert_bytes = float((w13_HD.numel() + w2_DF.numel()) * w13_HD.element_size())
    # each point computes every one of k distinct experts once; the time of one is the median / k
    k = _experts_past_cache(expert_bytes)
    pool = [(w13_HD.clone(), w2_DF.clone()) for _ in range(k)]

    def host(rows: int):
        return lambda: [swiglu(x_RD[:rows], a, b) for a, b in pool]

    # monotone: a point measured a little faster than a smaller one is noise
    curve_s = np.maximum.accumulate([_median_s(host(r), reps, lambda: None) / k for r in curve_rows])
    del pool
    # the line through the curve's ends (the affine summary; the curve itself is what the model uses)
    host_row_s = max((curve_s[-1] - curve_s[0]) / (curve_rows[-1] - curve_rows[0]), 1e-9)
    host_expert_s = max(curve_s[0] - curve_rows[0] * host_row_s, 0.0)
    src = (w13_HD.pin_memory(), w2_DF.pin_memory()) if cuda else (w13_HD, w2_DF)
    dst = (torch.empty_like(w13_HD, device=device), torch.empty_like(w2_DF, device=device))

    def copy():
        for s, d in zip(src, dst):
            d.copy_(s, non_blocking=True)

    pcie_bytes_per_s = expert_bytes / max(_median_s(copy, reps, sync), 1e-9)
    w13_1HD, w2_1DF = dst[0][None], dst[1][None]
    xs = torch.randn(272, hidden, generator=gen).to(dtype).to(device)

    launches = 16  # back to back per timing: one launch's time is within the jitter of a host-timed sync

    def kernel(rows: int):
        offsets = torch.tensor([0, rows], device=device)
        return lambda: [expert_mlp(xs[:rows], w13_1HD, w2_1DF, offsets) for _ in range(launches)]

    if cuda:
        from moeray.kernels.triton_swiglu import compile_tiles

        # every tile the layer step can pick, compiled now: fetch rounds reach row counts per slot
        # that no warm-up step of one size does, and a compile mid-step costs about a second
        compile_tiles(w13_1HD, w2_1DF)
    few, lots = (_median_s(kernel(rows), reps, sync) / launches for rows in (16, 272))
    device_row_s = max((lots - few) / 256, 1e-9)
    return TierRates(device_row_s=device_row_s, host_row_s=host_row_s, pcie_bytes_per_s=pcie_bytes_per_s,
                     expert_bytes=expert_bytes, row_bytes=float(hidden * w13_HD.element_size()),
                     device_floor_s=max(few - 16 * device_row_s, 0.0), host_expert_s=host_expert_s,
                     overlap=_measured_overlap(w13_HD, w2_DF, x_RD[:4], device, reps, sync),
                     host_curve_rows=tuple(float(r) for r in curve_rows), host_curve_s=tuple(float(t) for t in curve_s))


def _experts_past_cache(expert_bytes: float, total_bytes: int = 1 << 28, most: int = 32) -> int:
    """How many distinct experts of this size hold >= total_bytes (far past a CPU's last-level cache)."""
    return int(min(most, max(1, -(-total_bytes // int(expert_bytes)))))


def _measured_overlap(w13_HD, w2_DF, x_RD, device: torch.device, reps: int, sync) -> float:
    """TierRates.overlap: fetches of K experts and the host compute of K others, alone and at once
    (K: about 256 MiB of weights each, 2 to 8 experts). Where both draw on one host memory (the
    fetches' DMA reads it too), at once takes longer than the longer alone."""
    expert_bytes = (w13_HD.numel() + w2_DF.numel()) * w13_HD.element_size()
    k = max(2, min(8, _experts_past_cache(expert_bytes)))
    cuda = device.type == "cuda"

    def experts():
        out = [(w13_HD.clone(), w2_DF.clone()) for _ in range(k)]  # own pages: no cache sharing
        return [(a.pin_memory(), b.pin_memory()) for a, b in out] if cuda else out

    fetched, computed = experts(), experts()
    dst = [(torch.empty_like(a, device=device), torch.empty_like(b, device=device)) for a, b in fetched]

    def fetch():
        for (a, b), (da, db) in zip(fetched, dst):
            da.copy_(a, non_blocking=True)
            db.copy_(b, non_blocking=True)

    def host():
        for a, b in computed:
            swiglu(x_RD, a, b)

    def both():
        fetch()  # queued: the copies run while the host computes
        host()

    fetch_s, host_s = _median_s(fetch, reps, sync), _median_s(host, reps, lambda: None)
    both_s = _median_s(both, reps, sync)
    return float(np.clip((fetch_s + host_s - both_s) / max(min(fetch_s, host_s), 1e-12), 0.0, 1.0))

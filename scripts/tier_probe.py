"""Ceilings for the host-tier benchmark (issue 13), measured on the device machine: host memory
read bandwidth with torch's threads, CPU bf16 / fp32 matmul rates, pinned H2D copy, HBM copy."""

import json
import os
import sys
import time

import torch


def median_s(fn, reps=5, sync=lambda: None):
    fn(); sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); sync(); out.append(time.perf_counter() - t)
    return sorted(out)[len(out) // 2]


res = {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}
src = torch.randn((1 << 28) // 2, dtype=torch.float32).to(torch.bfloat16)  # 256 MiB bf16
dst = torch.empty_like(src)
res["host_copy_GBps"] = 2 * src.numel() * 2 / median_s(lambda: dst.copy_(src)) / 1e9  # read + write
res["host_sum_read_GBps"] = src.numel() * 2 / median_s(lambda: torch.sum(src)) / 1e9
for dtype in (torch.bfloat16, torch.float32):
    for rows in (16, 512):
        a, b = torch.randn(rows, 4096).to(dtype), torch.randn(14336, 4096).to(dtype)
        s = median_s(lambda: a @ b.T, reps=3)
        res[f"cpu_matmul_{str(dtype)[6:]}_{rows}rows_TFLOPs"] = 2 * rows * 4096 * 14336 / s / 1e12
        res[f"cpu_matmul_{str(dtype)[6:]}_{rows}rows_GBps_weights"] = b.numel() * b.element_size() / s / 1e9
if torch.cuda.is_available():
    sync = torch.cuda.synchronize
    pinned = src.pin_memory()
    dev = torch.empty_like(src, device="cuda")
    res["h2d_pinned_GBps"] = src.numel() * 2 / median_s(lambda: dev.copy_(pinned, non_blocking=True), sync=sync) / 1e9
    dev2 = torch.empty_like(dev)
    res["hbm_copy_GBps"] = 2 * dev.numel() * 2 / median_s(lambda: dev2.copy_(dev), sync=sync) / 1e9
    a, b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16), torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    res["gpu_bf16_matmul_TFLOPs"] = 2 * 8192 ** 3 / median_s(lambda: a @ b, sync=sync) / 1e12
print(json.dumps(res, indent=1))
if len(sys.argv) > 1:
    open(sys.argv[1], "w").write(json.dumps(res, indent=1))

"""Which of the two Triton launches makes a sharded slot cost its whole width at prefill sizes:
each launch of expert_mlp_triton timed alone (do_bench median) for whole / sharded / narrow slots.
usage: python scripts/shard_kernel_diag.py"""

from __future__ import annotations

import torch
import triton

from moeray.kernels import triton_swiglu as ts
from shard_kernel_timing import make_inputs  # scripts/ is this script's sys.path[0]


def launches(D, F, S, rows, width, mode):
    x, w13, w2, offs, width_S = make_inputs(D, F, S, rows, width, mode)
    M, ffn = x.shape[0], w2.shape[2]
    up, down = ts.pick_configs(M, S, D, ffn)
    h = torch.empty(M, ffn, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(M, D, device="cuda", dtype=torch.bfloat16)
    wptr = width_S if width_S is not None else offs
    common = dict(HAS_ORDER=False, HAS_WIDTH=width_S is not None, S_POW2=max(16, triton.next_power_of_2(S + 1)),
                  PRECISION="tf32", UPCAST=False)
    gate_up = lambda: ts._launch(ts._gate_up_kernel, up, ffn, M, S, D, ffn, (x, w13, h, offs, offs, wptr),  # noqa: E731
                                 (x.stride(0), w13.stride(0), w13.stride(1), h.stride(0)), EVEN_K=D % up.BK == 0,
                                 K_ALIGN=down.BK, **common)
    down_ = lambda: ts._launch(ts._down_kernel, down, D, M, S, D, ffn, (h, w2, y, offs, offs, wptr),  # noqa: E731
                               (h.stride(0), w2.stride(0), w2.stride(1), y.stride(0)), EVEN_K=ffn % down.BK == 0, **common)
    gate_up(); down_(); torch.cuda.synchronize()
    return (triton.testing.do_bench(gate_up, warmup=25, rep=100, return_mode="median"),
            triton.testing.do_bench(down_, warmup=25, rep=100, return_mode="median"))


for D, F, S, rows in ((4096, 14336, 2, 1024), (7168, 2048, 8, 1024), (2048, 1408, 8, 1024), (4096, 14336, 2, 128)):
    for width, mode in ((F, "whole"), (F // 2, "sharded"), (F // 2, "narrow")):
        g, d = launches(D, F, S, rows, width, mode)
        print(f"D={D} F={F} S={S} rows/slot={rows} width={width} {mode:8s} gate_up {g:.4f} ms  down {d:.4f} ms", flush=True)

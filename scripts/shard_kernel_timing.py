"""Triton expert kernel: whole slots vs sharded slots (width_S) vs a narrower whole expert of the
same width, bf16 on one GPU (median of triton.testing.do_bench). Prints one JSON line per case.

What it answers: a shard of width w should cost about w / F of the whole slot's time when the
launch is compute-bound, and the same as an expert whose FFN width is w (the `narrow` row): the
gap between `sharded` and `narrow` is what the width path itself costs.

usage: python scripts/shard_kernel_timing.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from moeray.kernels import expert_mlp


def make_inputs(D, F, S, rows_per_slot, width, mode, seed=0):
    """(x, w13, w2, slot offsets, width_S or None) of one case: S slots of `rows_per_slot` rows, bf16;
    `narrow` experts are `width` wide, the others F (`sharded`: width_S = width)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    ffn = width if mode == "narrow" else F
    M = S * rows_per_slot
    x = torch.randn(M, D, device="cuda", generator=g).to(torch.bfloat16)
    w13 = (torch.randn(S, 2 * ffn, D, device="cuda", generator=g) / D**0.5).to(torch.bfloat16)
    w2 = (torch.randn(S, D, ffn, device="cuda", generator=g) / ffn**0.5).to(torch.bfloat16)
    offs = torch.arange(S + 1, device="cuda") * rows_per_slot
    width_S = torch.full((S,), width, device="cuda", dtype=torch.int32) if mode == "sharded" else None
    return x, w13, w2, offs, width_S


def case(D, F, S, rows_per_slot, width, mode, seed=0):
    x, w13, w2, offs, width_S = make_inputs(D, F, S, rows_per_slot, width, mode, seed)
    M = x.shape[0]
    fn = lambda: expert_mlp(x, w13, w2, offs, None, impl="triton", width_S=width_S)  # noqa: E731
    fn()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    flops = 6.0 * M * D * width
    return {"D": D, "F": F, "S": S, "rows_per_slot": rows_per_slot, "width": width, "mode": mode,
            "ms": ms, "tflops": flops / ms / 1e9}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for D, F, S in ((2048, 1408, 8), (7168, 2048, 8), (4096, 14336, 2)):
        for rows_per_slot in (16, 128, 1024):
            for width, mode in ((F, "whole"), (F // 2, "sharded"), (F // 2, "narrow"), (F // 4, "sharded"), (F // 4, "narrow")):
                row = case(D, F, S, rows_per_slot, width, mode)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

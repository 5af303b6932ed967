"""expert_mlp: the one entry point the engine calls, and the chooser between implementations.

Legend (shape suffixes):
    M  rows of x (tokens as they arrived)
    X  (token, slot) rows to compute, X <= M (usually X == M)
    S  local expert slots;  D hidden;  F expert ffn width;  H = 2F

Contract: y_MD[order_X[n]] = expert_{slot(n)}(x_MD[order_X[n]]), rows of x not listed are 0,
slot s owns order_X[slot_offsets_S1[s]:slot_offsets_S1[s+1]]; order_X=None means x is sorted.

"auto": CPU -> reference (Triton needs a GPU outside the interpreter). On a CUDA device,
bf16 -> the faster of triton / grouped_mm per shape, from _AUTO_TABLE (measured, see below);
other dtypes -> triton (grouped_mm is bf16-only on Hopper).
"""

from __future__ import annotations

import torch

from .reference import expert_mlp_reference

IMPLS = ("reference", "triton", "grouped_mm", "auto")

# Source: `python -m moeray.bench.kernel` on one NVIDIA H100 80GB HBM3, 2026-11-22
# (docs/benchmarks/kernel.md, kernel.json). Key: mean rows per touched slot r = X / min(S, X) and
# the ffn width F, both host-known. Measured: the Triton kernel wins every decode/mid case and every
# fine-grained (F <= 1024) case by 1.2-1.9x; for wide experts (Mixtral, F = 14336) at r >= 512 the
# CUTLASS grouped GEMM is as fast or slightly faster (large dense per-slot GEMMs, where the gather
# and the extra elementwise passes cost little next to the matmul). First matching row wins.
_AUTO_TABLE: list[tuple[float, int, str]] = [
    # r_min, F_min, impl
    (512, 8192, "grouped_mm"),
    (0, 0, "triton"),
]


def choose_impl(x_MD: torch.Tensor, S: int, X: int, D: int, F: int) -> str:
    """The implementation "auto" runs for these shapes on this device (no host sync)."""
    if x_MD.device.type != "cuda":
        return "reference"
    if x_MD.dtype != torch.bfloat16:
        return "triton"  # grouped_mm is bf16-only on Hopper
    r = X / max(1, min(S, X))
    for r_min, f_min, impl in _AUTO_TABLE:
        if r >= r_min and F >= f_min:
            return impl
    return "triton"


def expert_mlp(
    x_MD: torch.Tensor,
    w13_SHD: torch.Tensor,
    w2_SDF: torch.Tensor,
    slot_offsets_S1: torch.Tensor,
    order_X: torch.Tensor | None = None,
    impl: str = "auto",
    width_S: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped SwiGLU experts over the rows of x_MD routed to this worker's slots; returns y_MD.

    ``width_S`` (int [S] on x's device, optional): FFN columns each slot uses (a sharded slot holds
    its columns first, zeros after: see moeray.expert_parallel). The reference and Triton paths do
    only those columns' work; grouped_mm computes the zero columns too (same result: silu(0) * 0 = 0
    times zero down columns), so it is correct but saves nothing for shards.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    M, D = x_MD.shape
    S, H, D_w = w13_SHD.shape
    if D_w != D or H % 2 or w2_SDF.shape != (S, D, H // 2):
        raise ValueError(f"shape mismatch: x {tuple(x_MD.shape)}, w13 {tuple(w13_SHD.shape)}, w2 {tuple(w2_SDF.shape)}")
    if width_S is not None and width_S.shape != (S,):
        raise ValueError(f"width_S must have S={S} entries, got {tuple(width_S.shape)}")
    if slot_offsets_S1.shape != (S + 1,):
        raise ValueError(f"slot_offsets must have S+1={S + 1} entries, got {tuple(slot_offsets_S1.shape)}")
    X = M if order_X is None else order_X.numel()
    if impl == "auto":
        impl = choose_impl(x_MD, S, X, D, H // 2)
    if impl == "reference":
        return expert_mlp_reference(x_MD, w13_SHD, w2_SDF, slot_offsets_S1, order_X, width_S)
    if impl == "triton":
        from .triton_swiglu import expert_mlp_triton  # lazy: triton is an optional dependency

        return expert_mlp_triton(x_MD, w13_SHD, w2_SDF, slot_offsets_S1, order_X, width_S=width_S)
    from .grouped_mm import expert_mlp_grouped_mm

    return expert_mlp_grouped_mm(x_MD, w13_SHD, w2_SDF, slot_offsets_S1, order_X)

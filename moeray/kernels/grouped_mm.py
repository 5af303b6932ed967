"""Grouped SwiGLU experts through torch._grouped_mm (CUTLASS grouped GEMM on Hopper, bf16).

Legend (shape suffixes):
    M  rows of x (tokens as they arrived)
    X  (token, slot) rows to compute, sorted by slot through order_X
    S  local expert slots;  D hidden;  F expert ffn width;  H = 2F

Unlike the Triton path this one moves the rows twice more through memory: it gathers x into
slot order (xs_XD), and scatters the result back (y_MD). The SwiGLU is done in place on the
gate half of h13_XH, which is then passed as a strided A operand (row stride H) to the second
grouped GEMM, so no extra X x F copy is made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Buffers that must be fully written come from here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def expert_mlp_grouped_mm(
    x_MD: torch.Tensor,
    w13_SHD: torch.Tensor,
    w2_SDF: torch.Tensor,
    slot_offsets_S1: torch.Tensor,
    order_X: torch.Tensor | None = None,
) -> torch.Tensor:
    M, D = x_MD.shape
    S, H, _ = w13_SHD.shape
    F_ = H // 2
    X = M if order_X is None else order_X.numel()
    y_MD = _empty((M, D), x_MD) if X == M else torch.zeros_like(x_MD)
    if X == 0:
        return y_MD
    xs_XD = x_MD if order_X is None else x_MD.index_select(0, order_X)
    # _grouped_mm wants the cumulative group ends as int32, on the device (no host sync).
    offs_S = slot_offsets_S1[1:].to(torch.int32)
    # B operands are (S, in, out) transposed views of the Linear weights; no copies.
    h13_XH = torch._grouped_mm(xs_XD, w13_SHD.transpose(-2, -1), offs=offs_S)
    h_XF = h13_XH[:, :F_]
    F.silu(h_XF, inplace=True)
    h_XF.mul_(h13_XH[:, F_:])
    ys_XD = torch._grouped_mm(h_XF, w2_SDF.transpose(-2, -1), offs=offs_S)
    if order_X is None:
        return ys_XD
    y_MD.index_copy_(0, order_X, ys_XD)  # scatter with the same index as the gather
    return y_MD

"""The slow, obviously-correct grouped SwiGLU expert computation (the oracle).

Legend (shape suffixes):
    M  rows of x (tokens as they arrived at this worker)
    X  (token, slot) rows to compute, X <= M (usually X == M)
    S  local expert slots on this worker
    D  hidden size
    F  expert ffn width;  H = 2F (gate rows [0, F) then up rows [F, 2F))

Every fast path in this package is tested against ``expert_mlp_reference``.
It is a python loop over slots with plain torch matmuls, in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(x_XD: torch.Tensor, w13_HD: torch.Tensor, w2_DF: torch.Tensor) -> torch.Tensor:
    """One expert: down(silu(gate(x)) * up(x)). w13 holds gate rows [0, F) then up rows [F, 2F)."""
    gate_XF, up_XF = (x_XD @ w13_HD.t()).chunk(2, dim=-1)
    return (F.silu(gate_XF) * up_XF) @ w2_DF.t()


def expert_mlp_reference(
    x_MD: torch.Tensor,
    w13_SHD: torch.Tensor,
    w2_SDF: torch.Tensor,
    slot_offsets_S1: torch.Tensor,
    order_X: torch.Tensor | None = None,
    width_S: torch.Tensor | None = None,
) -> torch.Tensor:
    """y_MD[order[n]] = down(silu(gate(x)) * up(x)) of x_MD[order[n]] for the slot owning n.

    Rows of x not listed in ``order_X`` stay 0 in the result. ``width_S`` (int [S], optional):
    the FFN columns slot s uses, a sharded slot's gate/up rows [0, w) and [F, F + w) and down
    columns [0, w) (moeray.expert_parallel's slot layout); None = every slot uses all F.
    """
    M, D = x_MD.shape
    S, H, D_w = w13_SHD.shape
    assert D_w == D and H % 2 == 0, (w13_SHD.shape, x_MD.shape)
    F_ = H // 2
    assert w2_SDF.shape == (S, D, F_), (w2_SDF.shape, (S, D, F_))
    assert slot_offsets_S1.numel() == S + 1

    y_MD = torch.zeros_like(x_MD)
    # host sync: the reference slices per slot on the host; it is the oracle, not a hot path.
    offsets = slot_offsets_S1.tolist()
    widths = [F_] * S if width_S is None else width_S.tolist()
    if order_X is None:
        order_X = torch.arange(M, device=x_MD.device)
    for s in range(S):
        lo, hi = offsets[s], offsets[s + 1]
        if hi == lo:
            continue  # empty slot: nothing routed here
        rows_n = order_X[lo:hi]
        xs_nD = x_MD.index_select(0, rows_n)
        w = widths[s]
        w13_HD = torch.cat([w13_SHD[s, :w], w13_SHD[s, F_:F_ + w]]) if w < F_ else w13_SHD[s]
        y_MD.index_copy_(0, rows_n, swiglu(xs_nD, w13_HD, w2_SDF[s, :, :w]))
    return y_MD

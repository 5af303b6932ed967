"""The weighted un-permute that ends a MoE layer: each token's K expert outputs, which come back
from the exchange in slot-sorted order, gathered and summed with the routing weights.

    out_TD[t] = sum_k weights_TK[t, k] * rows_ND[pos_N[t * K + k]],   pos_N = inverse(send_order_N)

Legend: T tokens, K top-k, N = T*K (token, k) pairs, D hidden.

Why a kernel: the obvious torch path scatters the rows back into (token, k) order, upcasts the
whole N x D block to fp32, multiplies and reduces (four passes over 2-4x the bytes of the rows).
At DeepSeek-V3 prefill sizes (16k tokens x 8 x 7168, bf16) that is ~2 GB of rows moved several
times per layer. The Triton kernel reads every row once and writes only T x D, accumulating in
fp32 in registers; the reference below is the obvious path and the tests hold the two together.
"""

from __future__ import annotations

import torch

IMPLS = ("reference", "triton", "auto")


def inverse_permutation(send_order_N: torch.Tensor) -> torch.Tensor:
    """pos_N with pos_N[send_order_N[i]] = i: where pair n sits in the slot-sorted rows."""
    pos_N = torch.empty_like(send_order_N)
    pos_N[send_order_N] = torch.arange(send_order_N.numel(), device=send_order_N.device)
    return pos_N


def unpermute(rows_ND: torch.Tensor, send_order_N: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """y_TKD: each (token, k) pair's row, from rows in send (slot-sorted) order."""
    y_ND = torch.empty_like(rows_ND)
    y_ND[send_order_N] = rows_ND
    return y_ND.view(num_tokens, top_k, rows_ND.shape[1])


def unpermute_weighted_reference(rows_ND: torch.Tensor, send_order_N: torch.Tensor,
                                 weights_TK: torch.Tensor) -> torch.Tensor:
    y_TKD = unpermute(rows_ND, send_order_N, *weights_TK.shape)
    return (y_TKD.float() * weights_TK.float().unsqueeze(-1)).sum(dim=1).to(rows_ND.dtype)


def unpermute_weighted(rows_ND: torch.Tensor, send_order_N: torch.Tensor, weights_TK: torch.Tensor,
                       impl: str = "auto") -> torch.Tensor:
    """out_TD: the routing-weighted sum of each token's K rows (fp32 accumulation, rows' dtype)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    T, K = weights_TK.shape
    if rows_ND.shape[0] != T * K or send_order_N.shape != (T * K,):
        raise ValueError(f"rows {tuple(rows_ND.shape)} and send_order {tuple(send_order_N.shape)} "
                         f"must have T*K = {T * K} entries for weights {tuple(weights_TK.shape)}")
    if impl == "auto":
        impl = "triton" if rows_ND.is_cuda else "reference"
    if impl == "reference" or T == 0:
        return unpermute_weighted_reference(rows_ND, send_order_N, weights_TK)
    from .triton_combine import unpermute_weighted_triton  # lazy: triton is an optional dependency

    return unpermute_weighted_triton(rows_ND, inverse_permutation(send_order_N), weights_TK)

"""The weighted un-permute that ends a MoE layer: each token's K expert outputs, which come back
from the exchange in slot-sorted order, gathered and summed with the routing weights.

    out_TD[t] = sum_k weights_TK[t, k] * rows_XD[pos_X[t * K + k]],   pos_X = inverse(send_order_X)

Legend: T tokens, K top-k, X = T*K (token, k) pairs, D hidden.

Why a kernel: the obvious torch path scatters the rows back into (token, k) order, upcasts the
whole X x D block to fp32, multiplies and reduces (four passes over 2-4x the bytes of the rows).
At DeepSeek-V3 prefill sizes (16k tokens x 8 x 7168, bf16) that is ~2 GB of rows moved several
times per layer. The Triton kernel reads every row once and writes only T x D, accumulating in
fp32 in registers; the reference below is the obvious path and the tests hold the two together.
"""

from __future__ import annotations

import torch

IMPLS = ("reference", "triton", "auto")


def inverse_permutation(send_order_X: torch.Tensor) -> torch.Tensor:
    """pos_X with pos_X[send_order_X[i]] = i: where pair n sits in the slot-sorted rows."""
    pos_X = torch.empty_like(send_order_X)
    pos_X[send_order_X] = torch.arange(send_order_X.numel(), device=send_order_X.device)
    return pos_X


def unpermute(rows_XD: torch.Tensor, send_order_X: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """y_TKD: each (token, k) pair's row, from rows in send (slot-sorted) order."""
    y_XD = torch.empty_like(rows_XD)
    y_XD[send_order_X] = rows_XD
    return y_XD.view(num_tokens, top_k, rows_XD.shape[1])


def unpermute_weighted_reference(rows_XD: torch.Tensor, send_order_X: torch.Tensor,
                                 weights_TK: torch.Tensor) -> torch.Tensor:
    y_TKD = unpermute(rows_XD, send_order_X, *weights_TK.shape)
    return (y_TKD.float() * weights_TK.float().unsqueeze(-1)).sum(dim=1).to(rows_XD.dtype)


def unpermute_weighted(rows_XD: torch.Tensor, send_order_X: torch.Tensor, weights_TK: torch.Tensor,
                       impl: str = "auto") -> torch.Tensor:
    """out_TD: the routing-weighted sum of each token's K rows (fp32 accumulation, rows' dtype)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    T, K = weights_TK.shape
    if rows_XD.shape[0] != T * K or send_order_X.shape != (T * K,):
        raise ValueError(f"rows {tuple(rows_XD.shape)} and send_order {tuple(send_order_X.shape)} "
                         f"must have T*K = {T * K} entries for weights {tuple(weights_TK.shape)}")
    if impl == "auto":
        impl = "triton" if rows_XD.is_cuda else "reference"
    if impl == "reference" or T == 0:
        return unpermute_weighted_reference(rows_XD, send_order_X, weights_TK)
    from .triton_combine import unpermute_weighted_triton  # lazy: triton is an optional dependency

    return unpermute_weighted_triton(rows_XD, inverse_permutation(send_order_X), weights_TK)

"""Triton twin of `moeray.kernels.combine.unpermute_weighted_reference`.

Legend: T tokens, K top-k, X = T*K pairs, D hidden; BT x BD the tokens x columns of one program.

One program owns a BT x BD tile of the output: for each k it loads the K row indices of its
tokens, gathers those rows' BD columns, and accumulates weight * row in fp32 registers. Every
row of rows_XD is read exactly once over the grid and out_TD is written once: the kernel moves
X*D + T*D elements, the floor for this operation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _unpermute_weighted_kernel(
    rows_ptr, pos_ptr, w_ptr, out_ptr, T, D, stride_r, stride_o,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = t < T
    mask = tmask[:, None] & (d[None, :] < D)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(K):
        pair = t.to(tl.int64) * K + k
        pos = tl.load(pos_ptr + pair, mask=tmask, other=0).to(tl.int64)
        w = tl.load(w_ptr + pair, mask=tmask, other=0.0).to(tl.float32)
        r = tl.load(rows_ptr + pos[:, None] * stride_r + d[None, :], mask=mask, other=0.0)
        acc += w[:, None] * r.to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * stride_o + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def unpermute_weighted_triton(rows_XD: torch.Tensor, pos_X: torch.Tensor, weights_TK: torch.Tensor,
                              block_t: int = 4, block_d: int = 512) -> torch.Tensor:
    T, K = weights_TK.shape
    D = rows_XD.shape[1]
    rows_XD = rows_XD.contiguous()
    weights_TK = weights_TK.contiguous()
    out_TD = torch.empty((T, D), dtype=rows_XD.dtype, device=rows_XD.device)
    if T == 0:
        return out_TD
    block_d = min(block_d, triton.next_power_of_2(D))
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    _unpermute_weighted_kernel[grid](
        rows_XD, pos_X, weights_TK, out_TD, T, D, rows_XD.stride(0), out_TD.stride(0),
        K=K, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    return out_TD

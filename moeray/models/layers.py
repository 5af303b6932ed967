"""Building blocks: RMSNorm, the SwiGLU expert, shared expert, and the all-experts reference.

Legend: T tokens, D hidden, F expert FFN width, H = 2F (gate rows then up rows), E experts, K top-k.
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.kernels.reference import swiglu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        x32 = x_TD.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x_TD.dtype)


class SharedExpert(nn.Module):
    """An expert every token visits; optionally scaled by sigmoid(gate(x)) (Qwen2-MoE)."""

    def __init__(self, hidden: int, ffn: int, gated: bool):
        super().__init__()
        self.w13_HD = nn.Parameter(torch.empty(2 * ffn, hidden))
        self.w2_DF = nn.Parameter(torch.empty(hidden, ffn))
        self.gate_1D = nn.Parameter(torch.empty(1, hidden)) if gated else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TD = swiglu(x_TD, self.w13_HD, self.w2_DF)
        if self.gate_1D is not None:
            y_TD = torch.sigmoid(x_TD @ self.gate_1D.t()) * y_TD
        return y_TD


class DenseExperts(nn.Module):
    """All E experts in one process, evaluated by a loop over experts: the oracle.

    Deliberately simple: for each expert, pick the (token, k) pairs routed to it, run the SwiGLU,
    and add the weighted result into the output. Everything else is tested against this.
    """

    def __init__(self, num_experts: int, hidden: int, ffn: int):
        super().__init__()
        self.w13_EHD = nn.Parameter(torch.empty(num_experts, 2 * ffn, hidden))
        self.w2_EDF = nn.Parameter(torch.empty(num_experts, hidden, ffn))

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        for expert in range(self.w13_EHD.shape[0]):
            token_idx, k_idx = torch.nonzero(topk_ids_TK == expert, as_tuple=True)
            if token_idx.numel() == 0:
                continue
            y_XD = swiglu(x_TD[token_idx], self.w13_EHD[expert], self.w2_EDF[expert])
            weight_X1 = topk_weights_TK[token_idx, k_idx].unsqueeze(-1)
            out_TD.index_add_(0, token_idx, (y_XD.float() * weight_X1))
        return out_TD.to(x_TD.dtype)

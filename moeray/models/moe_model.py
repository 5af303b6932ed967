"""The MoE model. It runs unchanged in one process; expert parallelism is applied after
construction by swapping each layer's `experts` module (see moeray/worker.py). This file never
imports distributed code.

Legend: T tokens, D hidden, V vocab, E experts, K top-k.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
from torch import nn

from moeray.config import ModelConfig
from moeray.models.layers import DenseExperts, RMSNorm, SharedExpert
from moeray.models.routing import route


class ExpertsModule(Protocol):
    def __call__(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
    ) -> torch.Tensor: ...


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight_ED = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.selection_bias_E = nn.Parameter(torch.zeros(cfg.num_experts)) if cfg.selection_bias else None

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_TE = x_TD.float() @ self.weight_ED.float().t()
        return route(logits_TE, self.cfg, self.selection_bias_E)


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, experts: nn.Module):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.router = Router(cfg)
        self.experts = experts
        self.shared_expert = (
            SharedExpert(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.shared_expert_gate)
            if cfg.shared_expert_intermediate_size
            else None
        )

    def forward(self, h_TD: torch.Tensor) -> torch.Tensor:
        x_TD = self.norm(h_TD)
        topk_ids_TK, topk_weights_TK = self.router(x_TD)
        y_TD = self.experts(x_TD, topk_ids_TK, topk_weights_TK)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        return h_TD + y_TD


class MoEModel(nn.Module):
    """embedding -> L x MoELayer (pre-norm, residual) -> RMSNorm -> LM head.

    `experts_factory(layer_idx)` builds each layer's experts module; the default is the
    all-experts reference loop, so `MoEModel(cfg)` alone is the single-process oracle.
    """

    def __init__(self, cfg: ModelConfig, experts_factory: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.cfg = cfg
        factory = experts_factory or (
            lambda _layer: DenseExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        )
        self.embed_VD = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(MoELayer(cfg, factory(i)) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head_VD = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))

    @torch.no_grad()
    def forward(self, input_ids_T: torch.Tensor) -> torch.Tensor:
        h_TD = self.embed_VD[input_ids_T]
        for layer in self.layers:
            h_TD = layer(h_TD)
        return self.norm(h_TD).float() @ self.lm_head_VD.float().t()


@torch.no_grad()
def init_random_(model: MoEModel, seed: int) -> MoEModel:
    """Deterministic random weights scaled so activations and router logits stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
        elif name.endswith("selection_bias_E"):
            param.copy_(0.1 * torch.randn(param.shape, generator=gen))
        elif name == "embed_VD":
            param.copy_(torch.randn(param.shape, generator=gen))
        else:
            fan_in = param.shape[-1]
            param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))
    return model

"""The decoder-only MoE language model shared by every family (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3).

    embed_tokens -> L x DecoderLayer -> norm -> (compute_logits) lm_head
    DecoderLayer:  h += self_attn(input_layernorm(h));  h += mlp(post_attention_layernorm(h))
    mlp:           MoEBlock (router -> experts(x, topk_ids, topk_weights) + shared expert) in the
                   layers of `cfg.moe_layer_indices`, a dense SwiGLU MLP in the others.

It runs unchanged in one process; expert parallelism is applied at construction through
`experts_factory(moe_layer_index)` (the worker passes one that builds `SlotExperts`). This file never
imports distributed code. Module and parameter names follow transformers' in-memory names where the
math is the same (self_attn.q_proj, input_layernorm, ...), so the family adapters stay small.

Legend: T tokens in the step, X any number of rows, D hidden, V vocab, E experts, K top-k,
F expert FFN width, H = 2F (gate rows then up rows).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from moeray.config import ModelConfig
from moeray.models.attention import GQAAttention
from moeray.models.kv_cache import AttentionBatch, PagedKVCache
from moeray.models.layers import DenseExperts, RMSNorm, SharedExpert
from moeray.models.routing import route

ExpertsFactory = Callable[[int], nn.Module]


class Router(nn.Module):
    """Router logits in float32 -> (topk_ids_TK, topk_weights_TK) by the family's rule (routing.py)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight_ED = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.selection_bias_E = nn.Parameter(torch.zeros(cfg.num_experts)) if cfg.selection_bias else None

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_TE = x_TD.float() @ self.weight_ED.float().t()
        return route(logits_TE, self.cfg, self.selection_bias_E)


class MoEBlock(nn.Module):
    """Routed experts plus the optional shared expert (Qwen2-MoE: sigmoid-gated; DeepSeek: plain)."""

    def __init__(self, cfg: ModelConfig, experts: nn.Module):
        super().__init__()
        self.router = Router(cfg)
        self.experts = experts
        self.shared_expert = (
            SharedExpert(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.shared_expert_gate)
            if cfg.shared_expert_intermediate_size else None
        )

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        topk_ids_TK, topk_weights_TK = self.router(x_TD)
        y_TD = self.experts(x_TD, topk_ids_TK, topk_weights_TK)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        return y_TD


def _attention(cfg: ModelConfig, layer_index: int) -> nn.Module:
    if cfg.is_mla:
        # The one family-specific attention module; imported lazily so GQA families never need it.
        from moeray.models.deepseek_v3.mla import MLAAttention

        return MLAAttention(cfg, layer_index)
    return GQAAttention(cfg, layer_index)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, experts: nn.Module | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = _attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # experts is None exactly for the dense layers: a SwiGLU MLP of width intermediate_size.
        self.mlp = (MoEBlock(cfg, experts) if experts is not None
                    else SharedExpert(cfg.hidden_size, cfg.intermediate_size, gated=False))

    def forward(self, h_TD: torch.Tensor, batch: AttentionBatch, cache: PagedKVCache,
                attention_impl: str) -> torch.Tensor:
        h_TD = h_TD + self.self_attn(self.input_layernorm(h_TD), batch, cache, attention_impl)
        return h_TD + self.mlp(self.post_attention_layernorm(h_TD))


class MoECausalLM(nn.Module):
    """The model of `cfg`. `experts_factory(moe_layer_index)` builds the experts module of each MoE
    layer (0 .. num_moe_layers - 1, in decoder order); the default is `DenseExperts`, so
    `MoECausalLM(cfg)` alone is the single-process oracle."""

    def __init__(self, cfg: ModelConfig, experts_factory: ExpertsFactory | None = None):
        super().__init__()
        self.cfg = cfg
        factory = experts_factory or (
            lambda _moe_layer: DenseExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size))
        moe_index_of = {layer: i for i, layer in enumerate(cfg.moe_layer_indices)}
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, layer, factory(moe_index_of[layer]) if layer in moe_index_of else None)
            for layer in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied: the LM head is the embedding matrix (no parameter of its own).
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def moe_blocks(self) -> list[MoEBlock]:
        """The MoE blocks in decoder order; block i belongs to decoder layer cfg.moe_layer_indices[i]."""
        return [self.layers[layer].mlp for layer in self.cfg.moe_layer_indices]

    def new_cache(self, num_blocks: int, block_size: int, device: torch.device | str = "cpu") -> PagedKVCache:
        """An empty paged KV cache shaped for this model (cfg.kv_cache_spec per layer)."""
        heads, k_dim, v_dim = self.cfg.kv_cache_spec
        return PagedKVCache(self.cfg.num_hidden_layers, num_blocks, block_size, heads, k_dim, v_dim,
                            self.embed_tokens.weight.dtype, device)

    @torch.no_grad()
    def forward(self, input_ids_T: torch.Tensor, batch: AttentionBatch, cache: PagedKVCache,
                attention_impl: str = "auto") -> torch.Tensor:
        """h_TD: final-normed hidden states of the step's T tokens (T may be 0). Writes the step's
        keys/values into `cache` at `batch.cache_index_T`."""
        if input_ids_T.shape[0] != batch.num_tokens:
            raise ValueError(f"{input_ids_T.shape[0]} token ids for a batch of {batch.num_tokens} tokens")
        h_TD = self.embed_tokens(input_ids_T)
        for layer in self.layers:
            h_TD = layer(h_TD, batch, cache, attention_impl)
        return self.norm(h_TD)

    @torch.no_grad()
    def compute_logits(self, h_XD: torch.Tensor) -> torch.Tensor:
        """float32 [X, V] logits of final-normed hidden states."""
        weight_VD = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if weight_VD.dtype == torch.float32:
            return h_XD.float() @ weight_VD.t()
        # bf16/fp16: the GEMM accumulates in fp32 already; upcasting the [V, D] weight first would
        # read and write it again every step (0.8 GB for a 32k x 4096 head).
        return (h_XD.to(weight_VD.dtype) @ weight_VD.t()).float()


@torch.no_grad()
def init_random_(model: MoECausalLM, seed: int) -> MoECausalLM:
    """Deterministic random weights scaled so activations, attention scores and router logits stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith("selection_bias_E") or name.endswith(".bias"):
            value = 0.1 * noise
        elif name == "embed_tokens.weight":
            value = noise
        else:
            value = noise / math.sqrt(param.shape[-1])  # fan-in scaling
        param.copy_(value.to(param.dtype))
    return model

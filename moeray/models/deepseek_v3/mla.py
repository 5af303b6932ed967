"""DeepSeek multi-head latent attention (MLA), as transformers' DeepseekV3Attention computes it.

    q  = q_proj(x)                     or q_b_proj(q_a_layernorm(q_a_proj(x)))   [T, A, nope + rope]
    kv = kv_a_proj_with_mqa(x)         -> latent [T, kv_lora_rank] and one shared k_rot [T, rope]
    latent -> kv_a_layernorm -> kv_b_proj -> per head k_nope [T, A, nope] and v [T, A, U]
    RoPE on q's rope part and on k_rot (interleaved pairs when `rope_interleave`), k_rot shared by
    every head; k = cat(k_nope, k_rot), q = cat(q_nope, q_rot); scale = (nope + rope) ** -0.5.

The cache stores the expanded per-head k (Y = nope + rope) and v (U = v_head_dim); caching the
latent instead would save memory and is left for later. The two low-rank norms use eps 1e-6
whatever the config's rms_norm_eps (transformers builds them with the default).

Legend: T tokens, D hidden, A heads, Y key head dim (nope + rope), U value head dim, R rope dims.
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.config import ModelConfig
from moeray.models.attention import RotaryEmbedding, apply_rope, attend
from moeray.models.kv_cache import AttentionBatch, PagedKVCache
from moeray.models.layers import RMSNorm

LOW_RANK_NORM_EPS = 1e-6


class MLAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.rope_interleave = cfg.rope_interleave
        qk_head_dim = self.nope_dim + self.rope_dim
        self.scale = qk_head_dim ** -0.5
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LOW_RANK_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + self.rope_dim, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LOW_RANK_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.rotary = RotaryEmbedding(self.rope_dim, cfg.rope_theta)

    def forward(self, x_TD: torch.Tensor, batch: AttentionBatch, cache: PagedKVCache,
                impl: str = "auto") -> torch.Tensor:
        num_tokens = x_TD.shape[0]
        if hasattr(self, "q_proj"):
            q_TX = self.q_proj(x_TD)
        else:
            q_TX = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_TD)))
        q_TAY = q_TX.view(num_tokens, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope_TAX, q_rot_TAR = q_TAY.split([self.nope_dim, self.rope_dim], dim=-1)

        latent_TX, k_rot_TR = self.kv_a_proj_with_mqa(x_TD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_TAX = self.kv_b_proj(self.kv_a_layernorm(latent_TX)).view(num_tokens, self.num_heads,
                                                                      self.nope_dim + self.v_dim)
        k_nope_TAX, v_TAU = kv_TAX.split([self.nope_dim, self.v_dim], dim=-1)

        cos_TR2, sin_TR2 = self.rotary(batch.positions_T.to(x_TD.device))
        q_rot_TAR = apply_rope(q_rot_TAR, cos_TR2, sin_TR2, self.rope_interleave)
        k_rot_T1R = apply_rope(k_rot_TR.unsqueeze(1), cos_TR2, sin_TR2, self.rope_interleave)

        q_TAY = torch.cat([q_nope_TAX, q_rot_TAR], dim=-1)
        k_TAY = torch.cat([k_nope_TAX, k_rot_T1R.expand(-1, self.num_heads, -1)], dim=-1)
        cache.write(self.layer_index, k_TAY, v_TAU.contiguous(), batch)
        o_TAU = attend(q_TAY, cache, self.layer_index, batch, self.scale, impl)
        return self.o_proj(o_TAU.reshape(num_tokens, self.num_heads * o_TAU.shape[-1]))

"""Causal self-attention over the paged KV cache: RoPE, grouped-query attention, two attend paths.

Each attention layer writes this step's keys/values into the cache (`PagedKVCache.write`), then
attends every new query to its sequence's whole context (cached + new), causally:
a query at position p sees keys at positions 0..p of its own sequence.

Two attend paths give the same result:
- `attend_reference`: a loop over sequences (`gather_sequence`, explicit causal mask). Slow and
  obviously correct; everything else is tested against it.
- `attend_batched`: one masked scaled-dot-product over the padded batch (`gather_batch`): queries
  padded to [B, N] (N = most new tokens of any sequence; decode: N = 1), keys to [B, C]
  (C = P * Z). Handles decode, prefill and mixed batches. The default ("auto").

Legend: T tokens in the step, B sequences, N new tokens per sequence (padded), C context positions,
D hidden, A query heads, J key/value heads, Y key head dim, U value head dim, R rotary dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeray.config import ModelConfig
from moeray.models.kv_cache import AttentionBatch, PagedKVCache
from moeray.models.layers import RMSNorm

ATTENTION_IMPLS = ("auto", "reference", "batched")


class RotaryEmbedding(nn.Module):
    """Default (unscaled) RoPE: frequency i of R/2 is theta^(-2i/R), as transformers computes it."""

    def __init__(self, rotary_dim: int, theta: float):
        super().__init__()
        inv_freq_R2 = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        # Not a parameter and not in the state dict: it is derived from the config.
        self.register_buffer("inv_freq_R2", inv_freq_R2, persistent=False)

    def forward(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos_TR2, sin_TR2) in float32: one angle per rotated pair."""
        angles_TR2 = positions_T.float()[:, None] * self.inv_freq_R2.float()[None, :]
        return angles_TR2.cos(), angles_TR2.sin()


def apply_rope(x_THR: torch.Tensor, cos_TR2: torch.Tensor, sin_TR2: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the last dim of x (any number of heads H) by each token's angles.

    Pair i is (x[i], x[i + R/2]) in the usual layout (transformers' `rotate_half`) and
    (x[2i], x[2i + 1]) when `interleaved` (DeepSeek). Either way the output holds the rotated first
    members in [0, R/2) and the second members in [R/2, R), which is what transformers returns (for
    the interleaved layout it de-interleaves; q and k get the same permutation, so q.k is unchanged).
    """
    if interleaved:
        first, second = x_THR[..., 0::2], x_THR[..., 1::2]
    else:
        half = x_THR.shape[-1] // 2
        first, second = x_THR[..., :half], x_THR[..., half:]
    cos_T1R2 = cos_TR2.unsqueeze(1).to(x_THR.dtype)
    sin_T1R2 = sin_TR2.unsqueeze(1).to(x_THR.dtype)
    return torch.cat([first * cos_T1R2 - second * sin_T1R2, second * cos_T1R2 + first * sin_T1R2], dim=-1)


def attend(q_TAY: torch.Tensor, cache: PagedKVCache, layer: int, batch: AttentionBatch, scale: float,
           impl: str = "auto") -> torch.Tensor:
    """o_TAU: each query attends causally to its sequence's cached context (already written)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "reference":
        return attend_reference(q_TAY, cache, layer, batch, scale)
    return attend_batched(q_TAY, cache, layer, batch, scale)


def _expand_kv_heads(x_XJW: torch.Tensor, num_heads: int, head_axis: int) -> torch.Tensor:
    """Key/value head j serves query heads j*G .. j*G+G-1 (G = A / J), as transformers' repeat_kv."""
    group = num_heads // x_XJW.shape[head_axis]
    return x_XJW if group == 1 else x_XJW.repeat_interleave(group, dim=head_axis)


def attend_reference(q_TAY: torch.Tensor, cache: PagedKVCache, layer: int, batch: AttentionBatch,
                     scale: float) -> torch.Tensor:
    """The oracle: per sequence, full scores over its context with an explicit causal mask (fp32)."""
    num_heads = q_TAY.shape[1]
    v_dim = cache.v[layer].shape[-1]
    out = []
    for seq in range(batch.num_seqs):
        lo, hi = batch.query_start_B1[seq], batch.query_start_B1[seq + 1]
        k_CJY, v_CJU = cache.gather_sequence(layer, batch, seq)
        k_CAY = _expand_kv_heads(k_CJY, num_heads, head_axis=1).float()
        v_CAU = _expand_kv_heads(v_CJU, num_heads, head_axis=1).float()
        q_NAY = q_TAY[lo:hi].float()
        scores_ANC = torch.einsum("nay,cay->anc", q_NAY, k_CAY) * scale
        query_pos_N = torch.arange(batch.starts[seq], batch.starts[seq] + (hi - lo), device=q_TAY.device)
        key_pos_C = torch.arange(k_CAY.shape[0], device=q_TAY.device)
        visible_NC = key_pos_C[None, :] <= query_pos_N[:, None]
        scores_ANC = scores_ANC.masked_fill(~visible_NC, float("-inf"))
        probs_ANC = torch.softmax(scores_ANC, dim=-1)
        out.append(torch.einsum("anc,cau->nau", probs_ANC, v_CAU).to(q_TAY.dtype))
    if not out:
        return q_TAY.new_zeros(0, num_heads, v_dim)
    return torch.cat(out, dim=0)


def attend_batched(q_TAY: torch.Tensor, cache: PagedKVCache, layer: int, batch: AttentionBatch,
                   scale: float) -> torch.Tensor:
    """One scaled-dot-product over the padded batch; same result as `attend_reference`.

    Padded query rows (sequence b's rows n >= num_new[b]) repeat b's last real row; their outputs
    are dropped. Every query row sees at least key 0, so no row is fully masked (no NaN).
    """
    num_tokens, num_heads, _ = q_TAY.shape
    v_dim = cache.v[layer].shape[-1]
    if num_tokens == 0:
        return q_TAY.new_zeros(0, num_heads, v_dim)
    k_BCJY, v_BCJU = cache.gather_batch(layer, batch)
    q_BANY = q_TAY[batch.rows_BN].transpose(1, 2)
    k_BJCY = k_BCJY.transpose(1, 2).to(q_TAY.dtype)
    v_BJCU = v_BCJU.transpose(1, 2).to(q_TAY.dtype)
    # enable_gqa: key/value head j serves query heads j*G .. j*G+G-1 without materialising copies.
    o_BANU = F.scaled_dot_product_attention(q_BANY, k_BJCY, v_BJCU, attn_mask=batch.visible_BNC()[:, None],
                                            scale=scale, enable_gqa=num_heads != k_BCJY.shape[2])
    o_XAU = o_BANU.transpose(1, 2).reshape(-1, num_heads, o_BANU.shape[-1])  # X = B * N cells
    return o_XAU.index_select(0, batch.cell_of_T)


class GQAAttention(nn.Module):
    """Grouped-query attention with RoPE (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

    Parameter names follow transformers (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm) so the
    adapters map checkpoint tensors one to one. Family differences are config flags:
    `qkv_bias`, `o_bias`, `qk_norm` ("per_head": RMSNorm over head_dim after the head split, Qwen3;
    "whole": RMSNorm over the whole projection before it, OLMoE), `clip_qkv` (OLMoE, after the norm).
    """

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.clip_qkv = cfg.clip_qkv
        self.qk_norm = cfg.qk_norm
        q_width, kv_width = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_width, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_width, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_width, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_width, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm == "per_head":
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        elif cfg.qk_norm == "whole":
            self.q_norm = RMSNorm(q_width, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(kv_width, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, x_TD: torch.Tensor, batch: AttentionBatch, cache: PagedKVCache,
                impl: str = "auto") -> torch.Tensor:
        num_tokens = x_TD.shape[0]
        q_TX, k_TX, v_TX = self.q_proj(x_TD), self.k_proj(x_TD), self.v_proj(x_TD)
        if self.qk_norm == "whole":
            q_TX, k_TX = self.q_norm(q_TX), self.k_norm(k_TX)
        if self.clip_qkv is not None:
            q_TX, k_TX, v_TX = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q_TX, k_TX, v_TX))
        q_TAY = q_TX.view(num_tokens, self.num_heads, self.head_dim)
        k_TJY = k_TX.view(num_tokens, self.num_kv_heads, self.head_dim)
        v_TJU = v_TX.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "per_head":
            q_TAY, k_TJY = self.q_norm(q_TAY), self.k_norm(k_TJY)
        cos_TR2, sin_TR2 = self.rotary(batch.positions_T.to(x_TD.device))
        q_TAY = apply_rope(q_TAY, cos_TR2, sin_TR2, interleaved=False)
        k_TJY = apply_rope(k_TJY, cos_TR2, sin_TR2, interleaved=False)
        cache.write(self.layer_index, k_TJY, v_TJU, batch)
        o_TAU = attend(q_TAY, cache, self.layer_index, batch, self.scale, impl)
        return self.o_proj(o_TAU.reshape(num_tokens, self.num_heads * o_TAU.shape[-1]))

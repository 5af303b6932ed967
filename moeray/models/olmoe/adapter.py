"""OLMoE (OlmoeForCausalLM): GQA + RoPE, RMSNorm of the whole projected q [A * head_dim] and k
[J * head_dim] (before the head split), `clip_qkv` clamps q, k, v after the norm, optional
`attention_bias` (q/k/v and o), softmax top-k with `norm_topk_prob` (false by default), no shared
expert, every layer MoE; the expert width is `intermediate_size`.

Checkpoint names: as Qwen3-MoE (q_norm.weight [A * head_dim], k_norm.weight [J * head_dim]).
"""

from __future__ import annotations

from typing import Any

from moeray.config import ModelConfig
from moeray.models.adapter_base import HFAdapter, common_fields, common_hf_fields

DEFAULTS: dict[str, Any] = dict(rms_norm_eps=1e-5, max_position_embeddings=4096, rope_theta=10000.0,
                                num_experts=64, num_experts_per_tok=8, vocab_size=50304)


class OlmoeAdapter(HFAdapter):
    architecture = "OlmoeForCausalLM"
    family = "olmoe"
    model_type = "olmoe"

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        fields = common_fields(hf, self.architecture, self.family, DEFAULTS)
        # transformers computes OLMoE's head_dim as hidden_size // num_attention_heads.
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
        bias = bool(hf.get("attention_bias", False))
        clip = hf.get("clip_qkv")
        return ModelConfig(
            **fields,
            qkv_bias=bias, o_bias=bias, qk_norm="whole", clip_qkv=None if clip is None else float(clip),
            moe_intermediate_size=int(hf["intermediate_size"]),
            num_experts=int(hf.get("num_experts") or hf.get("num_local_experts") or DEFAULTS["num_experts"]),
            top_k=int(hf.get("num_experts_per_tok") or DEFAULTS["num_experts_per_tok"]),
            scoring="softmax", norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        if cfg.qkv_bias != cfg.o_bias or cfg.qk_norm != "whole" or cfg.shared_expert_intermediate_size \
                or cfg.dense_layer_indices:
            raise ValueError("OLMoE: one attention_bias for q/k/v/o, whole-projection q/k norm, no shared "
                             "expert, no dense layers")
        return {
            **common_hf_fields(cfg, self),
            "attention_bias": cfg.qkv_bias, "clip_qkv": cfg.clip_qkv,
            "intermediate_size": cfg.moe_intermediate_size,
            "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k, "norm_topk_prob": cfg.norm_topk_prob,
            "output_router_logits": False, "pad_token_id": None,
        }


ADAPTER = OlmoeAdapter()

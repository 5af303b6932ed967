"""Qwen3-MoE (Qwen3MoeForCausalLM): GQA + RoPE, RMSNorm of q and k per head over head_dim (after
the head split, before RoPE), `head_dim` from the config, optional `attention_bias` (q/k/v and o),
softmax top-k (`norm_topk_prob`), dense layers by `mlp_only_layers` / `decoder_sparse_step`.

Checkpoint names: as Qwen2-MoE without the shared expert, plus
    model.layers.{l}.self_attn.q_norm.weight [head_dim]   model.layers.{l}.self_attn.k_norm.weight [head_dim]
"""

from __future__ import annotations

from typing import Any

from moeray.config import ModelConfig
from moeray.models.adapter_base import (HFAdapter, check_unsupported, common_fields, common_hf_fields,
                                        sparse_step_dense_layers)

DEFAULTS: dict[str, Any] = dict(rms_norm_eps=1e-6, max_position_embeddings=32768, num_key_value_heads=4,
                                rope_theta=10000.0, num_experts=128, num_experts_per_tok=8, vocab_size=151936)


class Qwen3MoeAdapter(HFAdapter):
    architecture = "Qwen3MoeForCausalLM"
    family = "qwen3_moe"
    model_type = "qwen3_moe"

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        check_unsupported(self.architecture, {"use_sliding_window=true": bool(hf.get("use_sliding_window"))})
        fields = common_fields(hf, self.architecture, self.family, DEFAULTS)
        # transformers 5 writes num_local_experts for Qwen3-MoE (older files: num_experts).
        num_experts = int(hf.get("num_experts") or hf.get("num_local_experts") or DEFAULTS["num_experts"])
        bias = bool(hf.get("attention_bias", False))
        return ModelConfig(
            **fields,
            qkv_bias=bias, o_bias=bias, qk_norm="per_head",
            intermediate_size=int(hf.get("intermediate_size") or 0),
            dense_layer_indices=sparse_step_dense_layers(
                fields["num_hidden_layers"], num_experts, int(hf.get("decoder_sparse_step") or 1),
                list(hf.get("mlp_only_layers") or [])),
            moe_intermediate_size=int(hf["moe_intermediate_size"]), num_experts=num_experts,
            top_k=int(hf.get("num_experts_per_tok") or DEFAULTS["num_experts_per_tok"]),
            scoring="softmax", norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        if cfg.qkv_bias != cfg.o_bias or cfg.qk_norm != "per_head" or cfg.shared_expert_intermediate_size:
            raise ValueError("Qwen3-MoE: one attention_bias for q/k/v/o, per-head q/k norm, no shared expert")
        return {
            **common_hf_fields(cfg, self),
            "head_dim": cfg.head_dim, "attention_bias": cfg.qkv_bias,
            "intermediate_size": cfg.intermediate_size or cfg.moe_intermediate_size,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k, "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": list(cfg.dense_layer_indices),
            "use_sliding_window": False, "sliding_window": None, "output_router_logits": False,
        }


ADAPTER = Qwen3MoeAdapter()

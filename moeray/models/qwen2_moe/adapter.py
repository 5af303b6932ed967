"""Qwen2-MoE (Qwen2MoeForCausalLM): GQA + RoPE with q/k/v biases (qkv_bias), softmax top-k
(`norm_topk_prob`, false by default), a shared expert scaled by sigmoid(shared_expert_gate(x)),
dense MLP layers (width `intermediate_size`) where `mlp_only_layers` / `decoder_sparse_step` say.

Checkpoint names (per-expert; the fused layout has experts.gate_up_proj / experts.down_proj):
    model.layers.{l}.mlp.gate.weight [E, D]
    model.layers.{l}.mlp.experts.{e}.gate_proj.weight [F, D]  .up_proj.weight [F, D]  .down_proj.weight [D, F]
    model.layers.{l}.mlp.shared_expert.{gate,up,down}_proj.weight
    model.layers.{l}.mlp.shared_expert_gate.weight [1, D]
    model.layers.{l}.mlp.{gate,up,down}_proj.weight (dense layers)
"""

from __future__ import annotations

from typing import Any

from moeray.config import ModelConfig
from moeray.models.adapter_base import (HFAdapter, check_unsupported, common_fields, common_hf_fields,
                                        sparse_step_dense_layers)

DEFAULTS: dict[str, Any] = dict(rms_norm_eps=1e-6, max_position_embeddings=32768, rope_theta=10000.0,
                                decoder_sparse_step=1, num_experts=60, num_experts_per_tok=4, vocab_size=151936)


class Qwen2MoeAdapter(HFAdapter):
    architecture = "Qwen2MoeForCausalLM"
    family = "qwen2_moe"
    model_type = "qwen2_moe"

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        check_unsupported(self.architecture, {"use_sliding_window=true": bool(hf.get("use_sliding_window"))})
        fields = common_fields(hf, self.architecture, self.family, DEFAULTS)
        num_experts = int(hf.get("num_experts") or DEFAULTS["num_experts"])
        shared = int(hf.get("shared_expert_intermediate_size") or 0)
        return ModelConfig(
            **fields,
            qkv_bias=bool(hf.get("qkv_bias", True)), o_bias=False,
            intermediate_size=int(hf.get("intermediate_size") or 0),
            dense_layer_indices=sparse_step_dense_layers(
                fields["num_hidden_layers"], num_experts, int(hf.get("decoder_sparse_step") or 1),
                list(hf.get("mlp_only_layers") or [])),
            moe_intermediate_size=int(hf["moe_intermediate_size"]), num_experts=num_experts,
            top_k=int(hf.get("num_experts_per_tok") or DEFAULTS["num_experts_per_tok"]),
            scoring="softmax", norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=shared, shared_expert_gate=shared > 0,
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        if not cfg.shared_expert_intermediate_size or not cfg.shared_expert_gate:
            raise ValueError("Qwen2-MoE layers always have a gated shared expert: set shared_expert_intermediate_size "
                             "> 0 and shared_expert_gate=True")
        if cfg.o_bias or cfg.qk_norm != "none":
            raise ValueError("Qwen2-MoE has no o_proj bias and no q/k norm")
        return {
            **common_hf_fields(cfg, self),
            "head_dim": cfg.head_dim, "qkv_bias": cfg.qkv_bias,
            "intermediate_size": cfg.intermediate_size or cfg.moe_intermediate_size,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
            "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k, "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": list(cfg.dense_layer_indices),
            "use_sliding_window": False, "sliding_window": None, "output_router_logits": False,
        }


ADAPTER = Qwen2MoeAdapter()

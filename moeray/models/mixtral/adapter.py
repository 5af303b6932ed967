"""Mixtral (MixtralForCausalLM): GQA + RoPE, no biases, softmax top-k always renormalised.

Checkpoint names: per-expert files (what transformers 5 `save_pretrained` and published checkpoints
write) keep the original module name `block_sparse_moe` with w1 = gate, w3 = up, w2 = down:
    model.layers.{l}.block_sparse_moe.gate.weight [E, D]
    model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight [F, D]  .w3.weight [F, D]  .w2.weight [D, F]
The fused layout uses transformers' in-memory names:
    model.layers.{l}.mlp.gate.weight [E, D]
    model.layers.{l}.mlp.experts.gate_up_proj [E, 2F, D]   model.layers.{l}.mlp.experts.down_proj [E, D, F]
"""

from __future__ import annotations

from typing import Any

from moeray.config import ModelConfig
from moeray.models.adapter_base import HFAdapter, check_unsupported, common_fields, common_hf_fields

DEFAULTS: dict[str, Any] = dict(rms_norm_eps=1e-5, max_position_embeddings=131072, num_key_value_heads=8,
                                rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)


class MixtralAdapter(HFAdapter):
    architecture = "MixtralForCausalLM"
    family = "mixtral"
    model_type = "mixtral"
    moe_module_per_expert = "block_sparse_moe"
    moe_module_fused = "mlp"
    expert_proj_names = ("w1", "w3", "w2")

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        check_unsupported(self.architecture, {f"sliding_window={hf.get('sliding_window')}": hf.get("sliding_window")
                                              is not None})
        fields = common_fields(hf, self.architecture, self.family, DEFAULTS)
        return ModelConfig(
            **fields,
            intermediate_size=0,
            moe_intermediate_size=int(hf["intermediate_size"]),  # Mixtral's experts use intermediate_size
            num_experts=int(hf.get("num_local_experts") or DEFAULTS["num_local_experts"]),
            top_k=int(hf.get("num_experts_per_tok") or DEFAULTS["num_experts_per_tok"]),
            scoring="softmax", norm_topk_prob=True,
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        if cfg.dense_layer_indices or cfg.shared_expert_intermediate_size or not cfg.norm_topk_prob:
            raise ValueError("Mixtral has no dense layers, no shared expert and always renormalises top-k")
        return {
            **common_hf_fields(cfg, self),
            "head_dim": cfg.head_dim, "intermediate_size": cfg.moe_intermediate_size,
            "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
            "sliding_window": None, "router_jitter_noise": 0.0, "output_router_logits": False,
        }


ADAPTER = MixtralAdapter()

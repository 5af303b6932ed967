"""DeepSeek-V3 (DeepseekV3ForCausalLM): MLA attention (mla.py), sigmoid routing with
e_score_correction_bias for selection, group-limited top-k (n_group, topk_group), routed_scaling_factor,
norm_topk_prob; n_shared_experts ungated shared experts (one MLP of width n_shared_experts *
moe_intermediate_size); the first `first_k_dense_replace` layers are dense (width intermediate_size).
Yarn / other scaled RoPE is not supported (raises, naming the rope type).

Checkpoint names (per-expert; the fused layout has experts.gate_up_proj / experts.down_proj):
    model.layers.{l}.self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}.weight
    model.layers.{l}.self_attn.{kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}.weight
    model.layers.{l}.mlp.gate.weight [E, D]   model.layers.{l}.mlp.gate.e_score_correction_bias [E]
    model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight   model.layers.{l}.mlp.shared_experts.*
Multi-token-prediction layers (num_nextn_predict_layers) are not part of the model and are ignored.
"""

from __future__ import annotations

from typing import Any

from moeray.config import ModelConfig
from moeray.errors import CheckpointError
from moeray.models.adapter_base import HFAdapter, common_fields, common_hf_fields

DEFAULTS: dict[str, Any] = dict(rms_norm_eps=1e-6, max_position_embeddings=4096, rope_theta=10000.0,
                                vocab_size=129280, n_routed_experts=256, num_experts_per_tok=8, n_group=8,
                                topk_group=4, n_shared_experts=1, routed_scaling_factor=2.5,
                                first_k_dense_replace=3, norm_topk_prob=True, rope_interleave=True)


class DeepseekV3Adapter(HFAdapter):
    architecture = "DeepseekV3ForCausalLM"
    family = "deepseek_v3"
    model_type = "deepseek_v3"
    shared_module = "shared_experts"

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        def get(key: str) -> Any:
            return DEFAULTS[key] if hf.get(key) is None else hf[key]

        fields = common_fields(hf, self.architecture, self.family, DEFAULTS)
        fields["head_dim"] = int(hf["qk_rope_head_dim"])  # transformers sets head_dim = qk_rope_head_dim
        fields["num_key_value_heads"] = fields["num_attention_heads"]  # MLA: keys/values per query head
        moe_width = int(hf["moe_intermediate_size"])
        first_dense = int(get("first_k_dense_replace"))
        if first_dense > fields["num_hidden_layers"]:
            raise CheckpointError(f"{self.architecture}: first_k_dense_replace={first_dense} > num_hidden_layers="
                                  f"{fields['num_hidden_layers']}")
        return ModelConfig(
            **fields,
            qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
            kv_lora_rank=int(hf["kv_lora_rank"]),
            q_lora_rank=None if hf.get("q_lora_rank") is None else int(hf["q_lora_rank"]),
            qk_nope_head_dim=int(hf["qk_nope_head_dim"]), qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
            v_head_dim=int(hf["v_head_dim"]), rope_interleave=bool(get("rope_interleave")),
            intermediate_size=int(hf.get("intermediate_size") or 0),
            dense_layer_indices=tuple(range(first_dense)),
            moe_intermediate_size=moe_width, num_experts=int(get("n_routed_experts")),
            top_k=int(get("num_experts_per_tok")), scoring="sigmoid", norm_topk_prob=bool(get("norm_topk_prob")),
            n_group=int(get("n_group")), topk_group=int(get("topk_group")),
            routed_scaling_factor=float(get("routed_scaling_factor")), selection_bias=True,
            shared_expert_intermediate_size=int(get("n_shared_experts")) * moe_width, shared_expert_gate=False,
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        first_dense = len(cfg.dense_layer_indices)
        if cfg.dense_layer_indices != tuple(range(first_dense)):
            raise ValueError(f"DeepSeek-V3's dense layers are the first k: dense_layer_indices="
                             f"{list(cfg.dense_layer_indices)} is not 0..k-1")
        if cfg.shared_expert_intermediate_size % cfg.moe_intermediate_size or cfg.shared_expert_gate:
            raise ValueError(f"DeepSeek-V3 shared experts are ungated and n x moe_intermediate_size wide: "
                             f"shared_expert_intermediate_size={cfg.shared_expert_intermediate_size}, "
                             f"moe_intermediate_size={cfg.moe_intermediate_size}")
        if cfg.scoring != "sigmoid" or not cfg.selection_bias or cfg.qkv_bias != cfg.o_bias:
            raise ValueError("DeepSeek-V3: sigmoid scoring with a selection bias, one attention_bias")
        return {
            **common_hf_fields(cfg, self),
            "attention_bias": cfg.qkv_bias, "kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim, "head_dim": cfg.qk_rope_head_dim, "rope_interleave": cfg.rope_interleave,
            "intermediate_size": cfg.intermediate_size or cfg.moe_intermediate_size,
            "moe_intermediate_size": cfg.moe_intermediate_size, "first_k_dense_replace": first_dense,
            "n_routed_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
            "n_shared_experts": cfg.shared_expert_intermediate_size // cfg.moe_intermediate_size,
            "n_group": cfg.n_group, "topk_group": cfg.topk_group, "norm_topk_prob": cfg.norm_topk_prob,
            "routed_scaling_factor": cfg.routed_scaling_factor, "num_nextn_predict_layers": 0,
            "output_router_logits": False,
        }


ADAPTER = DeepseekV3Adapter()

"""The model's side of the configuration: `ModelConfig` (one decoder-only MoE model of a family
we serve, from its Hugging Face config.json) and `tiny_model_config` (small random models of each
family for tests and the demo). The engine's runtime configuration is moeray.config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
Family = Literal["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


class ModelConfig(_Frozen):
    """A decoder-only MoE model of one of the Hugging Face families we serve.

    embedding -> L x (RMSNorm -> attention, residual; RMSNorm -> MoE block or dense MLP, residual)
    -> RMSNorm -> LM head. The family picks the attention kind and the checkpoint tensor names; every
    numerical difference between families is a field here:

    - attention: grouped-query attention with RoPE (`num_attention_heads` A, `num_key_value_heads` J,
      `head_dim`), optional q/k/v biases, optional q/k RMSNorm (`qk_norm`: "per_head" over head_dim
      as in Qwen3-MoE, "whole" over the projected A*head_dim / J*head_dim as in OLMoE), optional
      `clip_qkv`; or DeepSeek multi-head latent attention (MLA) when `kv_lora_rank` > 0.
    - routing: softmax scores -> top-k, optional renormalisation (Mixtral, Qwen-MoE, OLMoE);
      sigmoid scores + selection bias + group-limited top-k + routed scaling (DeepSeek-V3).
    - shared expert with a sigmoid gate (Qwen2-MoE) or without one (DeepSeek-V3).
    - dense layers (`dense_layer_indices`) use a SwiGLU MLP of width `intermediate_size` instead of
      routed experts.
    """

    architecture: str = Field(min_length=1, description="the Hugging Face class name, e.g. MixtralForCausalLM")
    family: Family
    vocab_size: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_hidden_layers: int = Field(ge=1)
    rms_norm_eps: float = Field(default=1e-6, gt=0)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = Field(default=None, ge=0)
    eos_token_ids: tuple[int, ...] = ()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    # Attention (GQA fields; for MLA `head_dim` is unused and the MLA fields below apply).
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    rope_theta: float = Field(default=10000.0, gt=0)
    max_position_embeddings: int = Field(default=4096, ge=1)
    qkv_bias: bool = False  # q/k/v projections (MLA: the q_a / kv_a input projections)
    o_bias: bool = False  # the output projection
    qk_norm: Literal["none", "per_head", "whole"] = "none"
    clip_qkv: float | None = Field(default=None, gt=0)

    # DeepSeek multi-head latent attention; kv_lora_rank = 0 means plain GQA.
    kv_lora_rank: int = Field(default=0, ge=0)
    q_lora_rank: int | None = Field(default=None, ge=1)  # None: a plain q_proj
    qk_nope_head_dim: int = Field(default=0, ge=0)
    qk_rope_head_dim: int = Field(default=0, ge=0)
    v_head_dim: int = Field(default=0, ge=0)
    rope_interleave: bool = False  # DeepSeek: rotary pairs are (x0, x1), (x2, x3), ...

    # Dense (non-MoE) decoder layers.
    intermediate_size: int = Field(default=0, ge=0)
    dense_layer_indices: tuple[int, ...] = ()

    # Routed experts.
    moe_intermediate_size: int = Field(ge=1)
    num_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True
    n_group: int = Field(default=1, ge=1)
    topk_group: int = Field(default=1, ge=1)
    routed_scaling_factor: float = Field(default=1.0, gt=0)
    selection_bias: bool = False  # DeepSeek-V3 e_score_correction_bias: affects selection only

    # Shared expert(s): every token visits them. DeepSeek's n_shared_experts experts are one MLP of
    # width n_shared_experts * moe_intermediate_size.
    shared_expert_intermediate_size: int = Field(default=0, ge=0)
    shared_expert_gate: bool = False

    @model_validator(mode="after")
    def _check_routing(self) -> ModelConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} > num_experts={self.num_experts}: cannot pick more experts than exist")
        if self.num_experts % self.n_group:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} > n_group={self.n_group}")
        per_group = self.num_experts // self.n_group
        if self.top_k > self.topk_group * per_group:
            raise ValueError(
                f"top_k={self.top_k} > topk_group={self.topk_group} x {per_group} experts per group: "
                "group-limited routing cannot pick that many"
            )
        if self.shared_expert_gate and not self.shared_expert_intermediate_size:
            raise ValueError("shared_expert_gate=True needs shared_expert_intermediate_size > 0")
        return self

    @model_validator(mode="after")
    def _check_layers(self) -> ModelConfig:
        bad = [i for i in self.dense_layer_indices if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"dense_layer_indices {bad} are outside 0..{self.num_hidden_layers - 1} "
                             f"(num_hidden_layers={self.num_hidden_layers})")
        if list(self.dense_layer_indices) != sorted(set(self.dense_layer_indices)):
            raise ValueError(f"dense_layer_indices={list(self.dense_layer_indices)} must be sorted and unique")
        if self.dense_layer_indices and not self.intermediate_size:
            raise ValueError(f"dense_layer_indices={list(self.dense_layer_indices)} need intermediate_size > 0")
        if not self.moe_layer_indices:
            raise ValueError(f"all {self.num_hidden_layers} layers are dense (dense_layer_indices="
                             f"{list(self.dense_layer_indices)}): an MoE model needs at least one MoE layer")
        return self

    @model_validator(mode="after")
    def _check_attention(self) -> ModelConfig:
        if self.is_mla:
            for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) < 1:
                    raise ValueError(f"MLA attention (kv_lora_rank={self.kv_lora_rank}) needs {name} >= 1, "
                                     f"got {getattr(self, name)}")
            if self.qk_rope_head_dim % 2:
                raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
            if self.num_key_value_heads != self.num_attention_heads:
                raise ValueError(f"MLA expands keys/values per query head: num_key_value_heads="
                                 f"{self.num_key_value_heads} must equal "
                                 f"num_attention_heads={self.num_attention_heads}")
            if self.qk_norm != "none" or self.clip_qkv is not None:
                raise ValueError("qk_norm / clip_qkv are GQA options; MLA attention uses neither")
            return self
        if self.family == "deepseek_v3":
            raise ValueError("family='deepseek_v3' needs MLA attention: kv_lora_rank >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if self.qk_norm == "whole" and self.num_attention_heads * self.head_dim != self.hidden_size:
            raise ValueError(
                f"qk_norm='whole' (OLMoE) normalises q over hidden_size: num_attention_heads={self.num_attention_heads}"
                f" x head_dim={self.head_dim} must equal hidden_size={self.hidden_size}")
        return self

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        """Decoder layers with routed experts, ascending. The runtime's L is their count."""
        dense = set(self.dense_layer_indices)
        return tuple(i for i in range(self.num_hidden_layers) if i not in dense)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)

    @property
    def kv_cache_spec(self) -> tuple[int, int, int]:
        """(J, Y, U) per layer as the paged cache stores it. MLA caches the expanded per-head keys
        (nope + rope dims) and values, so J = num_attention_heads there."""
        if self.is_mla:
            return self.num_attention_heads, self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim
        return self.num_key_value_heads, self.head_dim, self.head_dim

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size * self.itemsize

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token takes over all decoder layers."""
        heads, k_dim, v_dim = self.kv_cache_spec
        return self.num_hidden_layers * heads * (k_dim + v_dim) * self.itemsize


def tiny_model_config(family: str = "qwen3_moe", **overrides) -> ModelConfig:
    """A small random model of a real family for tests and the demo (milliseconds per step on one core).

    Every family gets: vocab 512, hidden 64, 2 layers, 8 experts of width 96, top-2, 4 query heads
    over 2 key/value heads of dim 16, 1024 positions; plus what makes the family itself (biases,
    q/k norms, shared experts, MLA). No layer is dense unless `dense_layer_indices` is overridden
    (the families with dense layers get intermediate_size 128). `overrides` replace any field.
    """
    base: dict = dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, moe_intermediate_size=96, num_experts=8, top_k=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rope_theta=10000.0, intermediate_size=128,
    )
    per_family: dict[str, dict] = {
        "mixtral": dict(architecture="MixtralForCausalLM", rms_norm_eps=1e-5, rope_theta=1e6, norm_topk_prob=True,
                        intermediate_size=0),
        "qwen2_moe": dict(architecture="Qwen2MoeForCausalLM", qkv_bias=True, norm_topk_prob=False,
                          shared_expert_intermediate_size=80, shared_expert_gate=True),
        "qwen3_moe": dict(architecture="Qwen3MoeForCausalLM", qk_norm="per_head", norm_topk_prob=True),
        "olmoe": dict(architecture="OlmoeForCausalLM", qk_norm="whole", norm_topk_prob=False, rms_norm_eps=1e-5,
                      intermediate_size=0),
        "deepseek_v3": dict(architecture="DeepseekV3ForCausalLM", num_key_value_heads=4, kv_lora_rank=32,
                            q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                            rope_interleave=True, head_dim=8, scoring="sigmoid", selection_bias=True, n_group=2,
                            topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                            shared_expert_intermediate_size=96),
    }
    if family not in per_family:
        raise ValueError(f"family={family!r} is not one of {sorted(per_family)}")
    base.update(per_family[family], family=family)
    base.update(overrides)
    return ModelConfig(**base)

"""Configuration at the boundaries (YAML, CLI, HTTP): pydantic models whose errors name the bad values.

Inside the runtime these are passed around frozen (`model_config = frozen`), so a config object
can be shipped to Ray actors and compared, never mutated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moeray.tier_config import HostTierConfig
from placement.cost import LinkRates


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


class TopologyConfig(_Frozen):
    """Link rates of the cluster, as the planner's cost models see them (bytes/s per worker per
    direction; defaults: placement.cost.LinkRates, NVLink measured, inter-node from DeepEP's docs)."""

    intra_node_bytes_per_s: float = Field(default=LinkRates.intra_node_bytes_per_s, gt=0, allow_inf_nan=False,
                                          description="between workers of one node (e.g. NVLink)")
    inter_node_bytes_per_s: float = Field(default=LinkRates.inter_node_bytes_per_s, gt=0, allow_inf_nan=False,
                                          description="between workers of different nodes (e.g. InfiniBand)")

    @field_validator("intra_node_bytes_per_s", "inter_node_bytes_per_s", mode="before")
    @classmethod
    def _no_bools(cls, value):
        if isinstance(value, bool):  # pydantic would read True as 1.0 byte/s
            raise ValueError(f"a rate in bytes/s, got {value!r}")
        return value


class ParallelConfig(_Frozen):
    """How many workers, how many expert slots each, and where they run."""

    num_workers: int = Field(default=1, ge=1)
    redundant_slots_per_worker: int = Field(default=0, ge=0)
    slots_per_worker: int | None = Field(default=None, ge=1)  # None: ceil(E / N) + redundant
    device: Literal["cpu", "cuda"] = "cpu"
    collective_timeout_s: float = Field(default=60.0, gt=0)
    placement_timeout_s: float = Field(
        default=120.0, gt=0, description="how long start-up waits for the cluster to fit the workers (autoscaling)")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    torch_threads_per_worker: int = Field(default=1, ge=1)
    step_loop: Literal["workers", "driver"] = Field(
        default="workers",
        description="who sequences steps: each worker's own loop, in lockstep by one small all-reduce per step "
                    "(the driver only sends admissions and collects output), or the driver, one Ray call per worker "
                    "per step (the simple reference path)")
    cuda_graphs: bool = Field(
        default=True, description="replay decode steps as CUDA graphs (one GPU worker only: an all-to-all syncs the host)")
    recovery: Literal["shrink", "replace"] = Field(
        default="shrink",
        description="after a lost worker: the survivors go on at once as a smaller group and a replacement joins "
                    "later when the cluster has room (shrink), or wait for a replacement at the same count (replace). "
                    "GPU workers are always replaced")
    rejoin: bool = Field(default=True, description="grow back to the configured worker count after a shrink")
    overlap_chunks: int = Field(
        default=1, ge=1, le=16,
        description="token chunks per MoE layer step; > 1 hides each chunk's all-to-all behind another chunk's expert math",
    )
    replica_split: Literal["planned", "per_batch"] = Field(
        default="planned",
        description="how a replicated expert's tokens are split across its replicas each step: by the planned weights "
                    "(planned), or from the batch's global per-expert counts, water-filling the busiest worker's rows "
                    "(per_batch: one small all-to-all of the counts per MoE layer, no host sync)")
    workers_per_node: int | None = Field(
        default=None, ge=1, strict=True,
        description="workers per node of the topology the planner sees (ranks 0..n-1 on node 0, ...); None: from the "
                    "nodes the workers started on (flat when a node's workers are not contiguous ranks)")
    topology: TopologyConfig = TopologyConfig()

    def resolve_slots_per_worker(self, num_experts: int) -> int:
        if self.slots_per_worker is not None:
            return self.slots_per_worker
        return math.ceil(num_experts / self.num_workers) + self.redundant_slots_per_worker


class StatsConfig(_Frozen):
    """Routing statistics shipped from workers to the coordinator."""

    enabled: bool = True
    snapshot_interval_steps: int = Field(default=8, ge=1)


class RebalanceConfig(_Frozen):
    """When and how the coordinator re-plans (see placement.policy for the hysteresis)."""

    enabled: bool = True
    window_steps: int = Field(default=64, ge=1, description="steps of load the planner sees")
    check_interval_steps: int = Field(default=16, ge=1, description="steps between policy checks")
    min_gain: float = Field(default=1.05, ge=1.0, description="current / predicted imbalance needed to act")
    cooldown_s: float = Field(default=10.0, ge=0)
    min_tokens: int = Field(default=1000, ge=0, description="routed pairs in the window before any decision")
    confirmations: int = Field(default=1, ge=1)
    drift_threshold: float = Field(default=0.2, gt=0, le=1,
                                   description="total-variation shift of the expert distribution that counts as a drift")
    fault_aware: bool = Field(
        default=False, description="plan second copies of the hottest experts on other workers / nodes, so one "
                                   "loss leaves a live copy (placement/fault_aware.py; costs more slot copies per re-plan)")
    stuck_timeout_s: float = Field(
        default=120.0, gt=0, description="a rebalance whose prepare or commit takes longer is abandoned and reported")
    planner: Literal["global", "hierarchical", "auto", "layout"] = Field(
        default="global",
        description="global: balance over all workers; hierarchical: expert groups onto nodes first, then balance in "
                    "each node; auto: hierarchical when its modelled layer time (placement.hierarchy) is lower; "
                    "layout: replicate or shard per layer by the step cost model (placement.layout_planner)")
    tokens_per_step: int | None = Field(
        default=None, ge=1, strict=True,
        description="tokens per step (all workers) the cost models of planner auto / layout plan for; None: measured "
                    "from the load window")


class CacheConfig(_Frozen):
    """Each worker's paged KV cache and the scheduler's limits (see moeray/generation/scheduler.py)."""

    block_size: int = Field(default=16, ge=1, le=1024, description="tokens per KV block")
    kv_tokens_per_worker: int = Field(
        default=32768, ge=1, description="KV cache capacity of one worker in tokens (rounded up to blocks)")
    max_model_len: int | None = Field(
        default=None, ge=2, description="longest sequence (prompt + generated); None: the model's max_position_embeddings")
    max_num_seqs: int = Field(default=256, ge=1, description="sequences one worker runs at once")
    max_num_batched_tokens: int = Field(default=8192, ge=1, description="prompt tokens prefilled per step, all workers")

    @property
    def blocks_per_worker(self) -> int:
        return -(-self.kv_tokens_per_worker // self.block_size)


class EngineConfig(_Frozen):
    model: ModelConfig
    parallel: ParallelConfig = ParallelConfig()
    stats: StatsConfig = StatsConfig()
    rebalance: RebalanceConfig = RebalanceConfig()
    cache: CacheConfig = CacheConfig()
    tier: HostTierConfig = HostTierConfig()
    seed: int = 0

    @property
    def max_model_len(self) -> int:
        limit = self.model.max_position_embeddings
        return limit if self.cache.max_model_len is None else min(self.cache.max_model_len, limit)

    @model_validator(mode="after")
    def _check_slots(self) -> EngineConfig:
        experts = self.model.num_experts
        workers = self.parallel.num_workers
        spw = self.parallel.resolve_slots_per_worker(experts)
        if self.rebalance.enabled and not self.stats.enabled:
            raise ValueError("rebalance.enabled=True needs stats.enabled=True: the coordinator plans from routing stats")
        if workers * spw < experts:
            raise ValueError(
                f"num_workers={workers} x slots_per_worker={spw} = {workers * spw} slots < "
                f"num_experts={experts}: every expert needs at least one slot"
            )
        if self.tier.device_slots_of(spw) < spw:
            if self.parallel.overlap_chunks > 1:
                raise ValueError(f"tier.device_slots={self.tier.device_slots} with parallel.overlap_chunks="
                                 f"{self.parallel.overlap_chunks}: a host tier runs without overlap chunks")
            if self.rebalance.planner == "layout":
                raise ValueError("tier.device_slots with rebalance.planner='layout': the host tier holds whole "
                                 "experts, the layout planner shards them")
        if self.tier.live(spw) and not self.stats.enabled:
            raise ValueError("tier.tiering='live' needs stats.enabled=True: the coordinator tiers from routing stats")
        return self

    @property
    def coordinator_ticks(self) -> bool:
        """Whether the engine asks the coordinator to decide every check_interval steps: the
        rebalance policy, or live host-tier swaps (which run with the policy off too)."""
        return self.rebalance.enabled or self.tier.live(self.slots_per_worker)

    @property
    def slots_per_worker(self) -> int:
        return self.parallel.resolve_slots_per_worker(self.model.num_experts)

    @classmethod
    def from_yaml(cls, path: str | Path) -> EngineConfig:
        with open(path) as fh:
            return cls.model_validate(yaml.safe_load(fh))


class EngineOptions(_Frozen):
    """Everything of an EngineConfig but the model, which comes from the checkpoint's config.json
    (YAML files and `LLM(...)` give these; `moeray.llm.engine_config_for` joins them)."""

    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None: the checkpoint's
    parallel: ParallelConfig = ParallelConfig()
    stats: StatsConfig = StatsConfig()
    rebalance: RebalanceConfig = RebalanceConfig()
    cache: CacheConfig = CacheConfig()
    tier: HostTierConfig = HostTierConfig()
    seed: int = 0


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

"""Configuration at the boundaries (YAML, CLI, HTTP): pydantic models whose errors name the bad values.

Inside the runtime these are passed around frozen (`model_config = frozen`), so a config object
can be shipped to Ray actors and compared, never mutated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Frozen):
    """A decoder-only MoE model: embedding -> L x (RMSNorm -> MoE, residual) -> RMSNorm -> LM head.

    Routing families:
    - softmax scores -> top-k, optional renormalisation (Mixtral, Qwen-MoE, OLMoE);
    - sigmoid scores + selection bias + group-limited top-k + routed scaling (DeepSeek-V3);
    - optional shared expert with a sigmoid gate (Qwen2-MoE) or without one (DeepSeek-V3).
    """

    vocab_size: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    moe_intermediate_size: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    num_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True
    n_group: int = Field(default=1, ge=1)
    topk_group: int = Field(default=1, ge=1)
    routed_scaling_factor: float = Field(default=1.0, gt=0)
    selection_bias: bool = False  # DeepSeek-V3 e_score_correction_bias: affects selection only
    shared_expert_intermediate_size: int = Field(default=0, ge=0)
    shared_expert_gate: bool = False
    rms_norm_eps: float = Field(default=1e-6, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

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

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (gate, up, down)."""
        itemsize = 4 if self.dtype == "float32" else 2
        return 3 * self.hidden_size * self.moe_intermediate_size * itemsize


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
    overlap_chunks: int = Field(
        default=1, ge=1, le=16,
        description="token chunks per MoE layer step; > 1 hides each chunk's all-to-all behind another chunk's expert math",
    )

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


class EngineConfig(_Frozen):
    model: ModelConfig
    parallel: ParallelConfig = ParallelConfig()
    stats: StatsConfig = StatsConfig()
    rebalance: RebalanceConfig = RebalanceConfig()
    seed: int = 0

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
        return self

    @property
    def slots_per_worker(self) -> int:
        return self.parallel.resolve_slots_per_worker(self.model.num_experts)

    @classmethod
    def from_yaml(cls, path: str | Path) -> EngineConfig:
        with open(path) as fh:
            return cls.model_validate(yaml.safe_load(fh))


def tiny_model_config(**overrides) -> ModelConfig:
    """A small random model for tests and the demo (runs in milliseconds on one CPU core)."""
    base = dict(
        vocab_size=512,
        hidden_size=64,
        moe_intermediate_size=96,
        num_layers=2,
        num_experts=8,
        top_k=2,
    )
    base.update(overrides)
    return ModelConfig(**base)

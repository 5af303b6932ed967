"""Configuration at the boundaries (YAML, CLI, HTTP): pydantic models whose errors name the bad values.

Inside the runtime these are passed around frozen (`model_config = frozen`), so a config object
can be shipped to Ray actors and compared, never mutated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from moeray.model_config import FAMILIES, Family, ModelConfig, _Frozen, tiny_model_config  # noqa: F401 (re-exported)
from moeray.tier_config import HostTierConfig
from placement.cost import LinkRates


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

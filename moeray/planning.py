"""Which planner the coordinator runs, on which topology: both from the config. No Ray here.

    setup = PlanningSetup.from_config(engine_config)
    per_node, why = setup.workers_per_node_for(node_ids)          # once, at the coordinator's start
    topology, why = setup.topology(num_workers, slots_per_worker, per_node)
    plan, choice = setup.plan(load_LE, topology, current, bytes_per_expert, tokens_per_step)

Topology: `parallel.workers_per_node`, else the node each worker started on (Ray node ids, rank
order): W_n when every node's workers are W_n contiguous ranks, else flat (one node) with the
reason. A worker count that is no multiple of W_n is planned flat too (a resize keeps W_n).

Planner (`rebalance.planner`):
  global        placement.planner.plan over all workers (the default; today's behaviour)
  hierarchical  the same with PlannerOptions(hierarchical=True): expert groups packed onto nodes
                first (the model's routing groups when they divide over the nodes, else one group
                per node), then balanced inside each node; global on one node or when E does not
                split into the groups
  auto          hierarchical when placement.hierarchy.hierarchical_pays says its modelled layer
                time is lower on this cluster (ClusterCostModel.measured: the model's shape, the
                configured inter-node rate, the tokens per step), else global
  layout        placement.layout_planner.plan_layout with a StepCostModel of the model's shape and
                the configured link rates: replicate or shard per layer (sharded placements and
                replica weights; the fault-aware pass does not apply)

Legend: L layers, E experts, W workers.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from placement import Placement, Topology
from placement.cost import ExpertShape, LinkRates, StepCostModel
from placement.fault_aware import FaultAwareOptions
from placement.metrics import imbalance
from placement.migration import migration_between
from placement.planner import Plan, PlannerOptions, plan

log = logging.getLogger(__name__)

PLANNERS = ("global", "hierarchical", "auto", "layout")


@dataclass(frozen=True)
class PlannerChoice:
    """The planner that ran for one plan ("global" | "hierarchical" | "layout") and why."""

    planner: str
    reason: str


def node_layout(node_ids) -> tuple[int | None, str]:
    """Workers per node from the node id of each rank (rank order): (W_n, reason) when every node
    holds W_n contiguous ranks, (None, reason) otherwise (the planner then sees one flat node)."""
    ids = [str(n) for n in node_ids]
    if not ids:
        return None, "no worker node ids: flat"
    runs = [1]
    for prev, cur in zip(ids, ids[1:]):
        if cur == prev:
            runs[-1] += 1
        else:
            runs.append(1)
    nodes = len(set(ids))
    if len(runs) != nodes:
        return None, (f"the workers of a node are not contiguous ranks (nodes by rank: {_short(ids)}): flat")
    if len(set(runs)) != 1:
        return None, f"nodes hold different numbers of workers ({runs}): flat"
    return runs[0], f"{nodes} node(s) x {runs[0]} workers, from the workers' node ids"


def _short(ids: list[str]) -> str:
    names = {}
    return " ".join(names.setdefault(n, f"n{len(names)}") for n in ids)


@dataclass(frozen=True)
class PlanningSetup:
    """What the coordinator plans with, from the config (`from_config`); defaults: global, flat."""

    mode: str = "global"
    workers_per_node: int | None = None  # configured (parallel.workers_per_node); None: from node ids
    intra_node_bytes_per_s: float = LinkRates.intra_node_bytes_per_s
    inter_node_bytes_per_s: float = LinkRates.inter_node_bytes_per_s
    shape: ExpertShape | None = None  # the model's experts (auto, layout)
    n_group: int = 1  # the model's routing groups (group-limited routing: n_group > 1)
    topk_group: int = 1
    tokens_per_step: int | None = None  # None: the caller measures it

    def __post_init__(self) -> None:
        if self.mode not in PLANNERS:
            raise ValueError(f"planner={self.mode!r} is not one of {PLANNERS}")
        if self.mode in ("auto", "layout") and self.shape is None:
            raise ValueError(f"planner={self.mode!r} needs the model's expert shape")

    @classmethod
    def from_config(cls, config) -> PlanningSetup:
        """From an EngineConfig: rebalance.planner / tokens_per_step, parallel's
        workers_per_node and link rates, the model's expert shape and routing groups."""
        model, par, reb = config.model, config.parallel, config.rebalance
        shape = ExpertShape(model.architecture, model.hidden_size, model.moe_intermediate_size, model.top_k,
                            float(model.itemsize), float(model.itemsize))
        return cls(mode=reb.planner, workers_per_node=par.workers_per_node,
                   intra_node_bytes_per_s=par.topology.intra_node_bytes_per_s,
                   inter_node_bytes_per_s=par.topology.inter_node_bytes_per_s, shape=shape,
                   n_group=model.n_group, topk_group=model.topk_group, tokens_per_step=reb.tokens_per_step)

    # ---- topology ------------------------------------------------------------------------------
    def workers_per_node_for(self, node_ids) -> tuple[int | None, str]:
        """The configured workers per node, else the one the node ids show (None: flat)."""
        if self.workers_per_node is not None:
            return self.workers_per_node, f"parallel.workers_per_node={self.workers_per_node}"
        if node_ids is None:
            return None, "no worker node ids: flat"
        per_node, reason = node_layout(node_ids)
        if per_node is None:
            log.warning("moeray: planning on a flat topology: %s", reason)
        return per_node, reason

    def topology(self, num_workers: int, slots_per_worker: int, workers_per_node: int | None) -> tuple[Topology, str]:
        """nodes x workers_per_node (flat when None or when num_workers is no multiple), with the
        configured link rates; and one line saying which."""
        rates = dict(intra_node_gbps=self.intra_node_bytes_per_s / 1e9, inter_node_gbps=self.inter_node_bytes_per_s / 1e9)
        if workers_per_node is None:
            return Topology(1, num_workers, slots_per_worker, **rates), "flat: one node"
        if num_workers % workers_per_node:
            return Topology(1, num_workers, slots_per_worker, **rates), (
                f"flat: {num_workers} workers are no multiple of workers_per_node={workers_per_node}")
        nodes = num_workers // workers_per_node
        return Topology(nodes, workers_per_node, slots_per_worker, **rates), f"{nodes} node(s) x {workers_per_node} workers"

    # ---- planning ------------------------------------------------------------------------------
    def num_groups(self, topology: Topology, num_experts: int) -> int | None:
        """Expert groups of the hierarchical plan: the model's routing groups when they divide over
        the nodes, else one per node; None when E does not split into them."""
        nodes = topology.num_nodes
        groups = self.n_group if self.n_group > 1 and self.n_group % nodes == 0 else nodes
        return groups if num_experts % groups == 0 else None

    def plan(self, load_LE: np.ndarray, topology: Topology, current: Placement | None, bytes_per_expert: int,
             tokens_per_step: float | None = None,
             fault_aware: FaultAwareOptions | None = None) -> tuple[Plan, PlannerChoice]:
        """The plan of the configured planner for `load_LE` [L, E] on `topology` from `current`,
        and which planner ran and why. `tokens_per_step`: measured (all workers), used by auto and
        layout unless the config fixes it; `fault_aware`: the global / hierarchical planner's pass."""
        tokens = max(1, int(round(self.tokens_per_step or tokens_per_step or 1)))
        choice = self.choose(load_LE, topology, tokens)
        if choice.planner == "layout":
            from placement.layout_planner import plan_layout

            links = LinkRates(self.intra_node_bytes_per_s, self.inter_node_bytes_per_s)
            result = plan_layout(load_LE, topology, StepCostModel(self.shape, links=links), tokens, current=current,
                                 bytes_per_expert=bytes_per_expert)
            used = Counter(result.layout_names)
            reason = (f"{choice.reason}; per layer: " + ", ".join(f"{name} x{n}" for name, n in sorted(used.items()))
                      + f" (predicted p99 {result.planning_p99_s['chosen'] * 1e6:.1f} us per step at {tokens} tokens)"
                      + ("; fault_aware does not apply to layout plans" if fault_aware is not None else ""))
            return result.plan, PlannerChoice("layout", reason)
        options = None
        if choice.planner == "hierarchical":
            options = PlannerOptions(hierarchical=True, num_groups=self.num_groups(topology, load_LE.shape[1]))
        return plan(load_LE, topology, current, bytes_per_expert, options, fault_aware=fault_aware), choice

    def choose(self, load_LE: np.ndarray, topology: Topology, tokens: int) -> PlannerChoice:
        """Which planner runs for this load and topology, and why (see the module docstring)."""
        if self.mode == "global":
            return PlannerChoice("global", "planner=global")
        if self.mode == "layout":
            return PlannerChoice("layout", "planner=layout")
        if topology.num_nodes == 1:
            return PlannerChoice("global", f"planner={self.mode}: one node, so global")
        groups = self.num_groups(topology, load_LE.shape[1])
        if groups is None:
            return PlannerChoice("global", f"planner={self.mode}: E={load_LE.shape[1]} experts do not split into "
                                           f"{topology.num_nodes} node groups, so global")
        if self.mode == "hierarchical":
            return PlannerChoice("hierarchical", f"planner=hierarchical: {groups} expert groups on "
                                                 f"{topology.num_nodes} nodes")
        from placement.hierarchy import ClusterCostModel, hierarchical_pays

        groups_per_token = self.topk_group if self.n_group > 1 else self.shape.top_k
        model = ClusterCostModel.measured(self.shape, topology, tokens, groups_per_token=groups_per_token)
        verdict = hierarchical_pays(load_LE, topology, model, num_groups=groups)
        figures = (f"modelled layer time global {verdict.global_us:.1f} us vs hierarchical {verdict.hierarchical_us:.1f} us "
                   f"(imbalance {verdict.global_imbalance:.3f} vs {verdict.hierarchical_imbalance:.3f}, {tokens} tokens "
                   f"per step, {topology.num_nodes} nodes)")
        if verdict.pays:
            return PlannerChoice("hierarchical", f"planner=auto: hierarchical pays: {figures}")
        return PlannerChoice("global", f"planner=auto: hierarchical does not pay: {figures}")


def requested_plan(current: Placement, requested: Placement, topology, load_LE: np.ndarray) -> Plan:
    """A caller's placement (Engine.rebalance(placement=...): an operator's pin, a test) as a plan
    from `current`: the migration between them and the imbalance it gives the windowed load.
    Raises ValueError naming what does not match the running group."""
    requested = requested.validate()
    for name in ("num_layers", "num_experts", "num_workers", "slots_per_worker"):
        if getattr(requested, name) != getattr(current, name):
            raise ValueError(f"the requested placement has {name}={getattr(requested, name)}, "
                             f"the engine runs {getattr(current, name)}")
    start = time.perf_counter()
    migration = migration_between(current, requested, topology)
    return Plan(requested, migration, imbalance(load_LE, requested), requested.weights_LS,
                1e3 * (time.perf_counter() - start))


def same_placement(a: Placement, b: Placement) -> bool:
    """The same slots, split weights (b has some) and shard widths."""
    if a.phy2log.shape != b.phy2log.shape or not np.array_equal(a.phy2log, b.phy2log) or b.replica_weights is None:
        return False
    return np.allclose(a.weights_LS, b.replica_weights) and np.allclose(a.width_LS, b.width_LS)

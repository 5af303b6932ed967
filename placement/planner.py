"""Our planner: balanced, duplicate-free, migration-aware placement of expert replicas.

Legend (docs/architecture.md): L MoE layers, E logical experts, S slots (= W * S_w),
W workers, S_w slots per worker (`spw`); nodes are spelled out.

`plan(load_LE, topology, current, bytes_per_expert, options) -> Plan`.

Fresh plan (no current placement, or a layer that must change a lot):
  1. replica counts: one per expert, each extra slot to the largest load per replica, never
     more replicas than workers (so no worker needs two copies);
  2. greedy packing, heaviest replica first, to the lightest worker with room that does not
     hold that expert;
  3. swap local search on the busiest worker until no swap lowers it;
  4. split weights of replicated experts re-balanced by water-filling (moves no bytes).
  Hierarchical (options.hierarchical): expert groups are first packed onto nodes (balanced,
  equal number of groups per node) and steps 1-4 run inside every node.

Re-plan from a current placement (migration-aware): `placement.replan`. Per layer, re-balance
the split weights of the current slots (free) and keep the slots when that is within
`keep_tolerance` of the fresh plan; else edit the current slots (surplus replicas to needy
experts, then swaps off the busiest worker) until within `target_tolerance`; else take the fresh
plan matched to the current slots. The fresh plan runs lazily, only for the layers a cheap lower
bound of its imbalance cannot decide.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from placement.fault_aware import FaultAwareOptions, make_fault_aware
from placement.layout import Migration, Placement, Topology, migration_between
from placement.metrics import equal_replica_weights, imbalance_of_worker_loads, slot_loads, worker_loads
from placement.packing import greedy_pack, repair_duplicates, replica_counts, replica_items
from placement.replan import replan_layers
from placement.replica_weights import balance_replica_weights
from placement.swaps import balance_pairs, refine_by_swaps


@dataclass(frozen=True)
class PlannerOptions:
    """Knobs of `plan`. Tolerances are relative to the fresh plan's imbalance of each layer."""

    keep_tolerance: float = 0.01  # keep a layer's slots if within this of the fresh plan
    target_tolerance: float = 0.02  # incremental re-plan stops once within this of the fresh plan
    migration_aware: bool = True  # False: always take the fresh plan (matched to current slots)
    hierarchical: bool = False  # pack expert groups to nodes first, then plan inside each node
    num_groups: int | None = None  # expert groups for hierarchical (default: one per node)
    max_swaps: int = 256  # per layer, per local search
    fresh_slack: float = 1e-3  # fresh plan's swap search stops within this of perfect balance
    num_partners: int = 8  # light workers tried as swap partners of the busiest one
    swap_parallel: int = 4  # re-plan: busiest workers per layer searching swaps at once (disjoint partners)
    pair_rounds: int = 4  # fresh plan: rounds of parallel heaviest/lightest pair balancing
    weight_sweeps: int = 8  # damped water-filling iterations over replicated experts (early exit)
    # re-plan: layers whose edit copies more than this fraction of their slots are edited again by
    # every variant (reassign tolerance, copy penalty per mean worker load) and keep the one with
    # the fewest copies whose imbalance is no worse (placement.replan.incremental); () turns it off
    edit_variants_min_copies: float = 0.2
    edit_variants: tuple = ((0.02, 0.03), (0.1, 0.03), (0.4, 0.03), (0.1, 0.0), (0.4, 0.0))


@dataclass(frozen=True, eq=False)
class Plan:
    """A new placement, how to get there, and what it should achieve under the planned load."""

    placement: Placement
    migration: Migration
    predicted_imbalance_LAYERS: np.ndarray  # [L] under load_LE with replica_weights
    replica_weights: np.ndarray  # [L, S] fraction of its expert's tokens each slot takes
    planning_ms: float
    bytes_moved: int = 0
    kept_LAYERS: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # [L] slots unchanged
    fresh_imbalance_LAYERS: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [L] of a from-scratch plan (re-plan: its lower bound where the fresh plan did not run)

    def replica_weights_LER(self) -> np.ndarray:
        """[L, E, R] split weights in log2phy order (0 padded), as dispatch wants them."""
        from placement.dispatch import replica_weights_by_expert

        return replica_weights_by_expert(self.replica_weights, self.placement.log2phy)


def _fresh_flat(load_LE: np.ndarray, num_workers: int, slots_per_worker: int, options: PlannerOptions):
    """Fresh plan of every row on one flat group of workers: (phy2log_LS, weights_LS)."""
    num_experts = load_LE.shape[1]
    num_slots = num_workers * slots_per_worker
    count_LE = replica_counts(load_LE, num_slots, max_replicas=num_workers)
    expert_LI, weight_LI = replica_items(load_LE, count_LE, num_slots)
    phy2log_LS = greedy_pack(expert_LI, weight_LI, num_workers, slots_per_worker)
    phy2log_LS = repair_duplicates(phy2log_LS, slots_per_worker, num_experts)
    tokens_LS = slot_loads(load_LE, phy2log_LS)
    # Good enough: within `fresh_slack` of perfect (split weights even out the rest).
    target_L = load_LE.sum(axis=1) / num_workers * (1 + options.fresh_slack)
    phy2log_LS, tokens_LS = balance_pairs(phy2log_LS, tokens_LS, slots_per_worker, num_experts, target_L, options.pair_rounds)
    for partners in (options.num_partners, num_workers - 1):
        phy2log_LS, tokens_LS, _ = refine_by_swaps(
            phy2log_LS, tokens_LS, slots_per_worker, num_experts,
            target_LAYERS=target_L, max_swaps=options.max_swaps, num_partners=partners,
        )
    if num_slots == num_experts:  # one slot per expert: also try EPLB's packing, keep the better layer
        phy2log_LS, tokens_LS = _better_of_eplb_packing(load_LE, phy2log_LS, tokens_LS, num_workers, slots_per_worker)
    weights_LS = equal_replica_weights(phy2log_LS, num_experts)
    # Split weights only where the swaps left the layer above its target (moves no bytes).
    busy = np.nonzero(tokens_LS.reshape(len(load_LE), num_workers, slots_per_worker).sum(axis=2).max(axis=1) > target_L)[0]
    if len(busy):
        weights_LS[busy] = balance_replica_weights(load_LE[busy], phy2log_LS[busy], slots_per_worker, sweeps=options.weight_sweeps)
    return phy2log_LS, weights_LS


def _better_of_eplb_packing(load_LE, phy2log_LS, tokens_LS, num_workers, slots_per_worker):
    """Without replicas a layer is a pure partition; per layer keep ours or EPLB's balanced
    packing (heaviest expert to the lightest pack with room), whichever has the lower maximum."""
    from placement.eplb import balanced_packing

    num_layers, num_experts = load_LE.shape
    pack_LE, rank_LE = balanced_packing(load_LE, num_workers)
    eplb_LS = np.empty_like(phy2log_LS)
    np.put_along_axis(eplb_LS, pack_LE * slots_per_worker + rank_LE, np.broadcast_to(np.arange(num_experts), load_LE.shape), axis=1)
    eplb_tokens_LS = slot_loads(load_LE, eplb_LS)
    ours_max_L = tokens_LS.reshape(num_layers, num_workers, slots_per_worker).sum(axis=2).max(axis=1)
    eplb_max_L = eplb_tokens_LS.reshape(num_layers, num_workers, slots_per_worker).sum(axis=2).max(axis=1)
    take = eplb_max_L < ours_max_L
    return np.where(take[:, None], eplb_LS, phy2log_LS), np.where(take[:, None], eplb_tokens_LS, tokens_LS)


def _group_to_node_maps(load_LE: np.ndarray, topology: Topology, num_groups: int) -> np.ndarray:
    """[L, E] node-major order of experts ("mlog -> log"): groups packed onto nodes, balanced."""
    from placement.eplb import balanced_packing

    num_layers, num_experts = load_LE.shape
    group_size = num_experts // num_groups
    groups_per_node = num_groups // topology.num_nodes
    group_load_LG = load_LE.reshape(num_layers, num_groups, group_size).sum(axis=2)
    node_LG, rank_LG = balanced_packing(group_load_LG, topology.num_nodes)
    log2mlog_LE = (((node_LG * groups_per_node + rank_LG) * group_size)[:, :, None] + np.arange(group_size)).reshape(
        num_layers, num_experts
    )
    mlog2log_LE = np.empty_like(log2mlog_LE)
    np.put_along_axis(mlog2log_LE, log2mlog_LE, np.broadcast_to(np.arange(num_experts), log2mlog_LE.shape), axis=1)
    return mlog2log_LE


def fresh_plan(load_LE: np.ndarray, topology: Topology, options: PlannerOptions) -> tuple[np.ndarray, np.ndarray]:
    """(phy2log_LS, weights_LS) planned from scratch, flat or hierarchical."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    num_layers, num_experts = load_LE.shape
    if not options.hierarchical or topology.num_nodes == 1:
        return _fresh_flat(load_LE, topology.num_workers, topology.slots_per_worker, options)
    num_nodes = topology.num_nodes
    num_groups = options.num_groups or num_nodes
    if num_experts % num_groups or num_groups % num_nodes:
        raise ValueError(f"hierarchical plan needs E={num_experts} % groups={num_groups} == groups % nodes={num_nodes} == 0")
    mlog2log_LE = _group_to_node_maps(load_LE, topology, num_groups)
    per_node = num_experts // num_nodes
    node_load = np.take_along_axis(load_LE, mlog2log_LE, axis=1).reshape(num_layers * num_nodes, per_node)
    phy2mlog, weights = _fresh_flat(node_load, topology.workers_per_node, topology.slots_per_worker, options)
    phy2mlog = phy2mlog.reshape(num_layers, num_nodes, -1)
    offset = (np.arange(num_nodes) * per_node)[None, :, None]
    phy2mlog = np.where(phy2mlog >= 0, phy2mlog + offset, -1).reshape(num_layers, -1)
    phy2log_LS = np.where(phy2mlog >= 0, np.take_along_axis(mlog2log_LE, np.maximum(phy2mlog, 0), axis=1), -1)
    return phy2log_LS, weights.reshape(num_layers, -1)


def plan(
    load_LE: np.ndarray,
    topology: Topology,
    current: Placement | None = None,
    bytes_per_expert: int = 1,
    options: PlannerOptions | None = None,
    fault_aware: FaultAwareOptions | None = None,
) -> Plan:
    """Plan a placement for `load_LE` [L, E] on `topology`, moving as little of `current` as pays.

    With `current`, the new placement is `current.version + 1` and `migration` lists the slot
    copies from `current`; without it, version 0 and an empty migration (weights load from the
    checkpoint).

    `fault_aware` (None: off): a post-pass over the planned slots that gives the hottest experts a
    second copy on another worker (and node) and re-balances (placement.fault_aware).
    """
    started = time.perf_counter()
    options = options or PlannerOptions()
    load_LE = np.asarray(load_LE, dtype=np.float64)
    if load_LE.ndim != 2:
        raise ValueError(f"load_LE must be [L, E], got shape {load_LE.shape}")
    num_layers, num_experts = load_LE.shape
    if topology.num_slots < num_experts:
        raise ValueError(f"{topology.num_slots} slots cannot hold {num_experts} experts")
    spw = topology.slots_per_worker

    if current is None:
        phy2log_LS, weights_LS = fresh_plan(load_LE, topology, options)
        kept_L = np.zeros(num_layers, dtype=bool)
        fresh_imb_L = imbalance_of_worker_loads(worker_loads(load_LE, phy2log_LS, spw, weights_LS))
    else:
        if current.phy2log.shape != (num_layers, topology.num_slots) or current.num_experts != num_experts:
            raise ValueError(
                f"current placement is {current.phy2log.shape} with E={current.num_experts}; "
                f"load/topology need ({num_layers}, {topology.num_slots}) with E={num_experts}"
            )
        phy2log_LS, weights_LS, kept_L, fresh_imb_L = replan_layers(
            load_LE, np.asarray(current.phy2log), topology, options, lambda rows_LE: fresh_plan(rows_LE, topology, options)
        )

    if fault_aware is not None:
        phy2log_LS, weights_LS = make_fault_aware(
            load_LE, phy2log_LS, weights_LS, topology, fault_aware,
            hierarchical=options.hierarchical and topology.num_nodes > 1,
            current_LS=None if current is None else np.asarray(current.phy2log),
            num_partners=options.num_partners, swap_parallel=options.swap_parallel, weight_sweeps=options.weight_sweeps,
        )
        if current is not None:  # a layer the pass changed did not keep its slots
            kept_L = kept_L & (phy2log_LS == np.asarray(current.phy2log)).all(axis=1)
    phy2log_LS = np.asarray(phy2log_LS, dtype=np.int64)
    if current is None:
        placement = Placement(phy2log_LS, num_experts, spw, 0, replica_weights=weights_LS)
        migration = Migration(*(np.zeros(0, dtype=np.int64) for _ in range(4)))
    else:
        placement = current.with_phy2log(phy2log_LS, replica_weights=weights_LS)
        migration = migration_between(current, placement, topology)
    predicted_L = imbalance_of_worker_loads(worker_loads(load_LE, phy2log_LS, spw, weights_LS))
    return Plan(
        placement=placement,
        migration=migration,
        predicted_imbalance_LAYERS=predicted_L,
        replica_weights=weights_LS,
        planning_ms=(time.perf_counter() - started) * 1e3,
        bytes_moved=migration.bytes_moved(bytes_per_expert),
        kept_LAYERS=kept_L,
        fresh_imbalance_LAYERS=fresh_imb_L,
    )

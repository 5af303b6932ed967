"""Fault-aware placement: hot experts keep a live copy when any one worker (or node) is lost.

Legend (docs/placement.md "Shape legend"): L MoE layers, E logical experts, S slots (= W * S_w;
suffix S again inside a worker), W workers, R replicas (here: the slots of one expert), X any
number of rows; local to placement/: A layers still working in a round, I candidate partner
workers of the most exposed worker. Nodes are spelled out.

An expert survives the loss of worker w when one of its replicas has no slot on w. The planner
never puts two copies of one expert on one worker, so every expert with >= 2 replicas survives
every single-worker loss; a loss takes down the load of the single-copy experts of that worker
(its "exposure"). `make_fault_aware` is a post-pass over the planner's slot map, fresh or
re-planned, so both planner paths get it and the packing stays as it is:

  1. protect: the hottest experts whose load adds up to `min_surviving_load` of the layer (and at
     least `protected_experts` of them; hierarchical: of every node) need >= 2 replicas. Hottest
     first, each one with a single copy gets a slot (1 copy): a free slot, else a replica of the
     expert that loses least, load / (count - 1), among experts with >= 3 replicas and unprotected
     ones with 2. A donor counts only while its replicas stay at or below max(the plan's largest
     replica, `max_replica_load` x mean worker load): the hottest experts keep the replicas balance
     needs, the rest of the redundancy buys second copies. Among the cheapest donor's slots: one
     on another node than the expert's copy, then the one leaving its worker lightest.
  2. re-balance: the swap search of placement.swaps on an equal split, towards the plan's busiest
     worker; swaps keep replica counts and never put two copies on one worker.
  3. spread (several nodes, not hierarchical): a replicated expert whose copies all sit on one
     node swaps one copy with the slot of another node of closest tokens, when that keeps every
     other expert's spread and lifts no worker above the busiest.
  4. even the exposure summed over layers (what `surviving_after_worker_loss` reports): fresh
     plans permute each layer's packs over the workers of their node (no slot is copied yet);
     every plan then swaps slots between the most and a least exposed worker of a node.
  5. split weights water-filled from an equal split, as the re-plan's keep check does; a layer
     whose busiest worker ends more than `max_balance_cost` above the plan's goes back to the plan,
     then layers go back (fewest first) while the worst single-worker loss is worse than the plan's.
Re-plans (a current placement) copy slots, so there: a layer the re-plan kept changes only if step
1 protects KEEP_PROTECTION_GAIN more of its load; donations must leave every worker they touch
within `max_balance_cost` of the plan's busiest (swaps stop there too); step 4 starts only past
REPLAN_EXPOSURE_SLACK. Each change is 1 copy per new second copy, 2 per swap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.fault_moves import (
    EPS,
    EXPOSURE_SLACK,
    even_exposure_by_swaps,
    exposed_tokens,
    permute_packs_by_exposure,
    spread_over_nodes,
)
from placement.layout import Placement, Topology, expert_counts, take_rows
from placement.metrics import slot_loads, worker_loads
from placement.replica_weights import balance_replica_weights
from placement.swaps import holds_map, refine_by_swaps

REPLAN_EXPOSURE_SLACK = 5e-3  # re-plans: step 4 starts only past this (1% load noise moves exposure ~1e-3)
KEEP_PROTECTION_GAIN = 0.01  # re-plans: a kept layer changes only if step 1 protects this share more of its load


@dataclass(frozen=True)
class FaultAwareOptions:
    """Knobs of the fault-aware pass: `plan(..., fault_aware=FaultAwareOptions())`."""

    min_surviving_load: float = 1.0  # protect the hottest experts holding this share of each layer's load
    protected_experts: int = 0  # ... and at least this many of the hottest experts of each layer
    max_replica_load: float = 0.5  # donors keep replicas <= this x mean worker load (or the plan's largest)
    max_balance_cost: float = 0.005  # a layer whose busiest worker ends this much above the plan's goes back
    spread_nodes: bool = True  # step 3: replicated experts on >= 2 nodes (topologies of several nodes)
    even_exposure: bool = True  # step 4: every worker's loss costs about the same
    max_swaps: int = 256  # budget of each swap search (per layer; step 4: over all layers)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_surviving_load <= 1.0:
            raise ValueError(f"min_surviving_load must be in [0, 1], got {self.min_surviving_load}")
        if self.protected_experts < 0 or not self.max_replica_load > 0 or self.max_balance_cost < 0 or self.max_swaps < 0:
            raise ValueError(f"need protected_experts, max_balance_cost, max_swaps >= 0 and max_replica_load > 0: {self}")


# ---- figures ------------------------------------------------------------------------------------


def _surviving(load_LE: np.ndarray, placement: Placement, group_of_worker_W: np.ndarray, num_groups: int) -> np.ndarray:
    """[groups] share of the load whose expert keeps a replica with no slot in the lost group."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    phy2log_LS = placement.phy2log
    num_layers, num_experts = load_LE.shape
    replicas_LE = np.rint(placement.num_replicas).astype(np.int64)
    max_rep = int(replicas_LE.max(initial=1)) + 1
    layer_X, slot_X = np.nonzero(phy2log_LS >= 0)
    group_X = group_of_worker_W[slot_X // placement.slots_per_worker]
    cell_X = (layer_X * num_experts + phy2log_LS[layer_X, slot_X]) * num_groups + group_X
    # one count per distinct (layer, expert, group, replica): the shards of one replica count once
    distinct_X = np.unique(cell_X * max_rep + placement.replica_of_slot[layer_X, slot_X])
    broken = np.bincount(distinct_X // max_rep, minlength=num_layers * num_experts * num_groups)
    alive = broken.reshape(num_layers, num_experts, num_groups) < replicas_LE[:, :, None]
    total = load_LE.sum()
    return np.einsum("le,leg->g", load_LE, alive) / total if total > 0 else np.ones(num_groups)


def surviving_after_worker_loss(load_LE: np.ndarray, placement: Placement) -> np.ndarray:
    """[W] `placement.metrics.surviving_load_after_worker_loss`, vectorised (one bincount)."""
    return _surviving(load_LE, placement, np.arange(placement.num_workers), placement.num_workers)


def surviving_after_node_loss(load_LE: np.ndarray, placement: Placement, topology: Topology) -> np.ndarray:
    """[num_nodes] share of the load (all layers) whose expert keeps a whole live copy when node n is lost."""
    node_W = topology.node_of_worker(np.arange(placement.num_workers))
    return _surviving(load_LE, placement, node_W, topology.num_nodes)


def protected_set(load_LE: np.ndarray, options: FaultAwareOptions) -> np.ndarray:
    """[L, E] bool: the hottest experts of each layer until their load reaches `min_surviving_load`
    of the layer's, and at least `protected_experts` of them (ties: lower expert id first)."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    order_LE = np.argsort(-load_LE, axis=1, kind="stable")
    cumulative_LE = np.cumsum(take_rows(load_LE, order_LE), axis=1)
    hotter_LE = cumulative_LE - take_rows(load_LE, order_LE)  # load of the hotter experts
    wanted_LE = hotter_LE < options.min_surviving_load * cumulative_LE[:, -1:] * (1 - EPS)
    wanted_LE |= np.arange(load_LE.shape[1]) < options.protected_experts
    protected_LE = np.zeros_like(wanted_LE)
    np.put_along_axis(protected_LE, order_LE, wanted_LE, axis=1)
    return protected_LE


# ---- the pass ---------------------------------------------------------------------------------------


def make_fault_aware(
    load_LE: np.ndarray,
    phy2log_LS: np.ndarray,
    weights_LS: np.ndarray,
    topology: Topology,
    options: FaultAwareOptions,
    *,
    hierarchical: bool = False,
    current_LS: np.ndarray | None = None,
    num_partners: int = 8,
    swap_parallel: int = 1,
    weight_sweeps: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """(phy2log_LS, weights_LS): the planned slot map and split weights made fault-aware (module
    docstring). `current_LS`: the slot map serving now (None: a fresh plan). `hierarchical`: every
    expert group lives on one node, so steps 1-2 run inside every node and nodes are not spread."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    planned_LS, weights_LS = np.asarray(phy2log_LS, dtype=np.int64), np.asarray(weights_LS, dtype=np.float64)
    num_layers, num_experts = load_LE.shape
    spw, num_nodes = topology.slots_per_worker, topology.num_nodes
    replan = current_LS is not None
    knobs = dict(replan=replan, num_partners=num_partners, swap_parallel=swap_parallel)
    if hierarchical and num_nodes > 1:  # one row per (layer, node), the experts of that node only
        rows_XS = planned_LS.reshape(num_layers * num_nodes, -1)
        node_load_XE = np.repeat(load_LE, num_nodes, axis=0) * (expert_counts(rows_XS, num_experts) > 0)
        node_topology = Topology.flat(topology.workers_per_node, spw)
        new_XS, tokens_XS = _protect(node_load_XE, rows_XS, weights_LS.reshape(rows_XS.shape), node_topology, options, False, **knobs)
        new_LS, tokens_LS = new_XS.reshape(num_layers, -1), tokens_XS.reshape(num_layers, -1)
    else:
        new_LS, tokens_LS = _protect(load_LE, planned_LS, weights_LS, topology, options, num_nodes > 1, **knobs)
    open_L = np.ones(num_layers, dtype=bool)  # layers steps 3-4 may change
    if replan:
        protected_L = [(load_LE * (expert_counts(p2l, num_experts) >= 2)).sum(axis=1) for p2l in (planned_LS, new_LS)]
        small_gain_L = protected_L[1] - protected_L[0] <= KEEP_PROTECTION_GAIN * load_LE.sum(axis=1)
        idle = np.flatnonzero(small_gain_L & (planned_LS == current_LS).all(axis=1))
        new_LS[idle], tokens_LS[idle] = planned_LS[idle], slot_loads(load_LE[idle], planned_LS[idle], weights_LS[idle])
        open_L[idle] = False
    if options.spread_nodes and not hierarchical and num_nodes > 1:
        rows = np.flatnonzero(open_L)
        new_LS[rows], tokens_LS[rows] = spread_over_nodes(new_LS[rows], tokens_LS[rows], topology, num_experts, options.max_swaps)
    if options.even_exposure and not replan:
        order_LS = permute_packs_by_exposure(new_LS, load_LE, topology)
        new_LS, tokens_LS = take_rows(new_LS, order_LS), take_rows(tokens_LS, order_LS)
    if options.even_exposure:
        start = REPLAN_EXPOSURE_SLACK if replan else EXPOSURE_SLACK
        new_LS, tokens_LS = even_exposure_by_swaps(new_LS, tokens_LS, topology, num_experts, options.max_swaps, open_L, start)
    changed = np.flatnonzero((new_LS != planned_LS).any(axis=1))
    if len(changed) == 0:
        return planned_LS, weights_LS
    new_weights_LS = weights_LS.copy()
    new_weights_LS[changed] = balance_replica_weights(load_LE[changed], new_LS[changed], spw, sweeps=weight_sweeps)
    busiest_L = worker_loads(load_LE, new_LS, spw, new_weights_LS).max(axis=1)
    back_L = busiest_L > worker_loads(load_LE, planned_LS, spw, weights_LS).max(axis=1) * (1 + options.max_balance_cost)
    new_LS[back_L] = planned_LS[back_L]
    back_L |= _layers_to_revert(load_LE, planned_LS, new_LS, topology)
    new_LS[back_L], new_weights_LS[back_L] = planned_LS[back_L], weights_LS[back_L]
    return new_LS, new_weights_LS


def _layers_to_revert(load_LE, planned_LS, new_LS, topology) -> np.ndarray:
    """[L] bool: layers to put back to the plan, fewest first, until the worst single-worker loss
    is no worse than the plan's (a coarse layout can leave one unlucky worker). Step 1 only trades a
    colder expert's second copy for a hotter one's, so every layer's mean survival is >= the plan's
    and reverting whole layers keeps the mean >= the plan's too."""
    num_experts, spw, num_workers = load_LE.shape[1], topology.slots_per_worker, topology.num_workers
    planned_LW, new_LW = (
        exposed_tokens(p2l, take_rows(load_LE, np.maximum(p2l, 0)), num_experts).reshape(len(p2l), num_workers, spw).sum(axis=2)
        for p2l in (planned_LS, new_LS))  # a single copy carries its expert's whole load
    planned_worst = planned_LW.sum(axis=0).max()
    reverted_L = np.zeros(len(new_LS), dtype=bool)
    while new_LW.sum(axis=0).max() > planned_worst * (1 + 1e-12) and not reverted_L.all():
        worst_if_reverted_L = (new_LW.sum(axis=0)[None, :] - new_LW + planned_LW).max(axis=1)
        layer = int(np.argmin(np.where(reverted_L, np.inf, worst_if_reverted_L)))
        new_LW[layer], reverted_L[layer] = planned_LW[layer], True
    return reverted_L


def _protect(load_LE, planned_LS, weights_LS, topology, options, prefer_other_node, replan, num_partners, swap_parallel):
    """Steps 1-2 of the module docstring on one flat group of workers: (phy2log_LS, tokens_LS)."""
    num_experts = load_LE.shape[1]
    spw, num_workers = topology.slots_per_worker, topology.num_workers
    count_LE = expert_counts(planned_LS, num_experts)
    cap_L = np.maximum((load_LE / np.maximum(count_LE, 1)).max(axis=1), options.max_replica_load * load_LE.sum(axis=1) / num_workers)
    tokens_LS = slot_loads(load_LE, planned_LS, weights_LS)
    target_L = tokens_LS.reshape(len(load_LE), num_workers, spw).sum(axis=2).max(axis=1) * (1 + options.max_balance_cost * replan)
    new_LS = add_second_copies(load_LE, planned_LS, topology, protected_set(load_LE, options), cap_L, prefer_other_node,
                               tokens_LS if replan else None, target_L if replan else None)
    changed = np.flatnonzero((new_LS != planned_LS).any(axis=1))
    if len(changed):
        # swaps on an equal split, as the fresh plan does: weights water-filled from it only do better
        tokens_LS[changed] = slot_loads(load_LE[changed], new_LS[changed])
        busy_L = np.zeros(len(new_LS), dtype=bool)
        busy_L[changed] = tokens_LS[changed].reshape(len(changed), num_workers, spw).sum(axis=2).max(axis=1) > target_L[changed]
        for partners in (num_partners, num_workers - 1):  # as the fresh plan: near partners, then all
            new_LS, tokens_LS, _ = refine_by_swaps(new_LS, tokens_LS, spw, num_experts, target_LAYERS=target_L, max_swaps=options.max_swaps,
                                                   num_partners=partners, active_LAYERS=busy_L, parallel=swap_parallel)
    return new_LS, tokens_LS


def add_second_copies(
    load_LE: np.ndarray,
    phy2log_LS: np.ndarray,
    topology: Topology,
    protected_LE: np.ndarray,
    cap_L: np.ndarray,
    prefer_other_node: bool = True,
    tokens_LS: np.ndarray | None = None,
    limit_L: np.ndarray | None = None,
) -> np.ndarray:
    """A copy of `phy2log_LS` where protected single-copy experts got a second slot (step 1 of the
    module docstring), hottest first, one expert per layer per round. `tokens_LS`: the slots'
    tokens (default: an equal split); with `limit_L` a donation must leave every worker it touches
    at or below the limit in them: the new copy's worker and the donor's other workers (they share
    the donated slot's tokens evenly)."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    phy2log_LS = np.array(phy2log_LS, dtype=np.int64, copy=True)
    num_layers, num_slots = phy2log_LS.shape
    num_experts = load_LE.shape[1]
    spw, num_workers = topology.slots_per_worker, topology.num_workers
    node_S = topology.node_of_worker(np.arange(num_slots) // spw)
    count_LE = expert_counts(phy2log_LS, num_experts)
    holds_LWE = holds_map(phy2log_LS, spw, num_experts)
    tokens_LS = slot_loads(load_LE, phy2log_LS) if tokens_LS is None else np.array(tokens_LS, dtype=np.float64, copy=True)
    stuck_LE = np.zeros(load_LE.shape, dtype=bool)  # no slot could take it
    pending = np.arange(num_layers)  # layers that may still have a needy expert
    while len(pending):
        needy_AE = protected_LE[pending] & (count_LE[pending] == 1) & ~stuck_LE[pending]
        some_A = needy_AE.any(axis=1)
        pending, active, needy_AE = pending[some_A], pending[some_A], needy_AE[some_A]
        if len(active) == 0:
            break
        ar = np.arange(len(active))
        load_AE, row_AS, tokens_AS = load_LE[active], phy2log_LS[active], tokens_LS[active]
        expert_A = np.argmax(np.where(needy_AE, load_AE, -np.inf), axis=1)
        # a slot as donor: free (costs nothing), or a spare replica whose expert's other replicas
        # then carry load / (count - 1) each, which must stay under the cap
        donor_AS = np.maximum(row_AS, 0)
        donor_count_AS = take_rows(count_LE[active], donor_AS)
        spare_AS = (donor_count_AS >= 3) | ((donor_count_AS == 2) & ~take_rows(protected_LE[active], donor_AS))
        cost_AS = np.where(row_AS < 0, 0.0, take_rows(load_AE, donor_AS) / np.maximum(donor_count_AS - 1, 1))
        eligible_AS = (row_AS < 0) | (spare_AS & (cost_AS <= cap_L[active][:, None] * (1 + EPS)))
        stuck_LE[active[~eligible_AS.any(axis=1)]] = True  # no donor left in the layer: it is done
        eligible_AS &= ~np.repeat(holds_LWE[active, :, expert_A], spw, axis=1)
        worker_load_AS = np.repeat(tokens_AS.reshape(len(active), num_workers, spw).sum(axis=2), spw, axis=1)
        after_AS = worker_load_AS - tokens_AS + (load_AE[ar, expert_A] / 2)[:, None]  # the new copy's worker
        if limit_L is not None:
            col_AS = np.where(row_AS >= 0, row_AS, num_experts)
            busiest_holder_AE = np.full((len(active), num_experts + 1), -np.inf)
            np.maximum.at(busiest_holder_AE, (ar[:, None], col_AS), worker_load_AS)
            rise_AS = take_rows(busiest_holder_AE, col_AS) + tokens_AS / np.maximum(donor_count_AS - 1, 1)
            eligible_AS &= np.maximum(after_AS, np.where(row_AS >= 0, rise_AS, -np.inf)) <= limit_L[active][:, None] * (1 + EPS)
        found_A = eligible_AS.any(axis=1)
        stuck_LE[active[~found_A], expert_A[~found_A]] = True
        active, expert_A, row_AS, eligible_AS, cost_AS, after_AS, load_AE, donor_count_AS = (
            x[found_A] for x in (active, expert_A, row_AS, eligible_AS, cost_AS, after_AS, load_AE, donor_count_AS))
        if len(active) == 0:
            continue
        ar = np.arange(len(active))
        home_A = np.argmax(row_AS == expert_A[:, None], axis=1)
        cost_AS = np.where(eligible_AS, cost_AS, np.inf)
        if prefer_other_node:
            after_AS = after_AS + (node_S[None, :] == node_S[home_A][:, None]) * (2 * load_AE.sum(axis=1, keepdims=True) + 1)
        slot_A = np.argmin(np.where(cost_AS <= cost_AS.min(axis=1, keepdims=True), after_AS, np.inf), axis=1)
        donor_A = row_AS[ar, slot_A]
        given = donor_A >= 0
        # tokens: the expert's two copies share its load, the donor's others the donated slot's
        others_AS = (row_AS == donor_A[:, None]) & given[:, None]
        others_AS[ar, slot_A] = False
        tokens_LS[active] += np.where(others_AS, (tokens_LS[active, slot_A] / np.maximum(donor_count_AS[ar, slot_A] - 1, 1))[:, None], 0.0)
        tokens_LS[active, slot_A] = tokens_LS[active, home_A] = load_AE[ar, expert_A] / 2
        holds_LWE[active[given], slot_A[given] // spw, donor_A[given]] = False
        count_LE[active[given], donor_A[given]] -= 1
        holds_LWE[active, slot_A // spw, expert_A] = True
        count_LE[active, expert_A] += 1
        phy2log_LS[active, slot_A] = expert_A
    return phy2log_LS

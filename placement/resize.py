"""Planning across worker counts: the placement for W workers becomes one for W' (scale up or down).

    plan = resize_plan(load_LE, current, num_workers=W', slots_per_worker=S_w', bytes_per_expert=b)

Two stages, so the result moves few experts:
1. `carry_over` lays the current placement onto the new topology: a worker that stays keeps the
   experts of its first min(S_w, S_w') slots where they are (less any replica copies dropped to
   make room); slots of leaving workers are gone, slots of new workers start free. Every expert left without a copy (its copies were on leaving
   workers, or in slots beyond S_w') is put into a free slot of the worker with the least load
   that has a free slot and does not hold it yet.
2. The migration-aware planner (`planner.plan`) re-plans from that layout for the load, so
   replicas and split weights fit W' and only layers where re-planning pays change further.

Pure numpy. Legend: L layers, E experts, S slots (S_w per worker), W workers.
"""

from __future__ import annotations

import numpy as np

from placement.fault_aware import FaultAwareOptions
from placement.layout import FREE_SLOT, Placement, Topology
from placement.planner import Plan, PlannerOptions, plan


def carry_over(current: Placement, num_workers: int, slots_per_worker: int, load_LE: np.ndarray) -> np.ndarray:
    """[L, W' * S_w'] phy2log: the current placement on the new topology, every expert present once
    at least (see the module docstring). Deterministic: ties go to the lowest worker rank."""
    num_layers, num_experts = current.phy2log.shape[0], current.num_experts
    if num_workers * slots_per_worker < num_experts:
        raise ValueError(f"num_workers={num_workers} x slots_per_worker={slots_per_worker} = "
                         f"{num_workers * slots_per_worker} slots cannot hold {num_experts} experts")
    kept_workers = min(current.num_workers, num_workers)
    kept_slots = min(current.slots_per_worker, slots_per_worker)
    phy2log_LWS = np.full((num_layers, num_workers, slots_per_worker), FREE_SLOT, dtype=np.int64)
    old_LWS = current.phy2log.reshape(num_layers, current.num_workers, current.slots_per_worker)
    phy2log_LWS[:, :kept_workers, :kept_slots] = old_LWS[:, :kept_workers, :kept_slots]
    load_LE = np.asarray(load_LE, dtype=np.float64)
    for layer in range(num_layers):
        row_WS = phy2log_LWS[layer]
        held = set(row_WS[row_WS >= 0].tolist())
        # The heaviest homeless experts first, each onto the least-loaded worker with room.
        homeless = sorted((e for e in range(num_experts) if e not in held), key=lambda e: (-load_LE[layer, e], e))
        # Replicas kept on staying workers may fill the slots the homeless need: drop copies of the
        # replicated expert with the least load per copy until there is room (it keeps >= 1 copy).
        while int((row_WS == FREE_SLOT).sum()) < len(homeless):
            experts, copies = np.unique(row_WS[row_WS >= 0], return_counts=True)
            replicated = experts[copies > 1]
            per_copy = load_LE[layer, replicated] / copies[copies > 1]
            victim = int(replicated[np.lexsort((replicated, per_copy))[0]])
            last = np.flatnonzero(row_WS.reshape(-1) == victim)[-1]
            row_WS.reshape(-1)[last] = FREE_SLOT
        worker_load_W = np.zeros(num_workers)
        for w in range(num_workers):
            experts = row_WS[w][row_WS[w] >= 0]
            worker_load_W[w] = load_LE[layer, experts].sum()
        for expert in homeless:
            free_W = (row_WS == FREE_SLOT).any(axis=1) & ~(row_WS == expert).any(axis=1)
            candidates = np.flatnonzero(free_W)
            worker = int(candidates[np.argmin(worker_load_W[candidates])])  # argmin: lowest rank on ties
            slot = int(np.flatnonzero(row_WS[worker] == FREE_SLOT)[0])
            row_WS[worker, slot] = expert
            worker_load_W[worker] += load_LE[layer, expert]
    return phy2log_LWS.reshape(num_layers, num_workers * slots_per_worker)


def resize_plan(load_LE: np.ndarray | None, current: Placement, num_workers: int, slots_per_worker: int,
                bytes_per_expert: int = 1, options: PlannerOptions | None = None,
                fault_aware: FaultAwareOptions | None = None) -> Plan:
    """A placement for `num_workers` x `slots_per_worker`, version current.version + 1 (the
    carried layout keeps the version, the planner's step from it adds one). `load_LE` None or all
    zero: uniform load (nothing has been measured yet)."""
    num_layers, num_experts = current.phy2log.shape[0], current.num_experts
    if load_LE is None or not np.asarray(load_LE).any():
        load_LE = np.ones((num_layers, num_experts))
    carried = Placement(carry_over(current, num_workers, slots_per_worker, load_LE), num_experts, slots_per_worker,
                        current.version).validate()
    return plan(load_LE, Topology.flat(num_workers, slots_per_worker), carried, bytes_per_expert, options,
                fault_aware=fault_aware)


def survivors_first(current: Placement, surviving_ranks: list[int]) -> Placement:
    """The current placement with its worker blocks reordered: the surviving ranks first, in the
    given order (they become ranks 0..W'-1), every other worker after them. `resize_plan(load,
    survivors_first(p, alive), len(alive), ...)` then plans for the survivors alone, keeping what
    each of them holds (recovery that shrinks instead of waiting for a replacement)."""
    surviving = [int(r) for r in surviving_ranks]
    if len(set(surviving)) != len(surviving) or any(not 0 <= r < current.num_workers for r in surviving):
        raise ValueError(f"surviving ranks {surviving_ranks} must be distinct ranks of the {current.num_workers} workers")
    order = surviving + [r for r in range(current.num_workers) if r not in surviving]
    num_layers, slots = current.phy2log.shape[0], current.slots_per_worker
    blocks_LWS = current.phy2log.reshape(num_layers, current.num_workers, slots)[:, order]
    return Placement(blocks_LWS.reshape(num_layers, -1).copy(), current.num_experts, slots, current.version).validate()

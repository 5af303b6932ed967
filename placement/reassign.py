"""Migration-aware edits of a current slot map, vectorised over layers.

Shapes:
    L  MoE layers    E  logical experts    S  slots (= W * C)    W  workers    C  slots per worker

`reassign_replicas`  gives slots of surplus replicas (or free slots) to experts whose load per
                     replica is above what a fresh plan would allow; one copy per change.
`match_to_current`   lays a freshly planned slot map over the current one: each new pack goes to
                     the worker holding most of its experts (greedy max-overlap matching), and
                     an expert that stays on a worker keeps its slot index.
"""

from __future__ import annotations

import numpy as np

from placement.metrics import slot_loads
from placement.packing import replica_counts


def reassign_replicas(
    load_LE: np.ndarray, phy2log_LS: np.ndarray, slots_per_worker: int, tolerance: float = 0.0
) -> np.ndarray:
    """Return a copy of `phy2log_LS` where, layer by layer, the expert f with the largest load per
    replica gets one more slot while that load exceeds the largest load per replica of a fresh
    replica allocation by more than `tolerance`. The slot comes from a free slot, else from the
    expert g with >= 2 replicas that loses least (smallest load_g / (count_g - 1), which must stay
    below f's load per replica); it is taken on the lightest worker that does not hold f.
    """
    load_LE = np.asarray(load_LE, dtype=np.float64)
    phy2log_LS = np.array(phy2log_LS, dtype=np.int64, copy=True)
    num_layers, num_experts = load_LE.shape
    num_slots = phy2log_LS.shape[1]
    num_workers = num_slots // slots_per_worker
    fresh_count_LE = replica_counts(load_LE, num_slots, max_replicas=num_workers)
    limit_L = (load_LE / fresh_count_LE).max(axis=1) * (1 + tolerance)
    count_LE = np.zeros((num_layers, num_experts), dtype=np.int64)
    layer_idx, slot_idx = np.nonzero(phy2log_LS >= 0)
    np.add.at(count_LE, (layer_idx, phy2log_LS[layer_idx, slot_idx]), 1)
    active = np.arange(num_layers)
    for _ in range(num_slots - num_experts):
        if len(active) == 0:
            break
        ar = np.arange(len(active))
        load_AE, count_AE, row_AS = load_LE[active], count_LE[active], phy2log_LS[active]
        per_replica_AE = np.where(count_AE < num_workers, load_AE / np.maximum(count_AE, 1), -np.inf)
        needy_A = np.argmax(per_replica_AE, axis=1)
        needy_load_A = per_replica_AE[ar, needy_A]
        loss_AE = np.where(count_AE >= 2, load_AE / np.maximum(count_AE - 1, 1), np.inf)
        loss_AE[ar, needy_A] = np.inf
        donor_A = np.argmin(loss_AE, axis=1)
        donor_ok_A = loss_AE[ar, donor_A] < needy_load_A
        holds_needy_AW = (row_AS == needy_A[:, None]).reshape(len(active), num_workers, slots_per_worker).any(axis=2)
        open_AS = ~np.repeat(holds_needy_AW, slots_per_worker, axis=1)
        free_AS = (row_AS < 0) & open_AS
        has_free_A = free_AS.any(axis=1)
        donor_AS = (row_AS == donor_A[:, None]) & open_AS
        candidate_AS = np.where(has_free_A[:, None], free_AS, donor_AS & donor_ok_A[:, None])
        worker_load_AW = slot_loads(load_AE, row_AS).reshape(len(active), num_workers, slots_per_worker).sum(axis=2)
        score_AS = np.where(candidate_AS, np.repeat(worker_load_AW, slots_per_worker, axis=1), np.inf)
        slot_A = np.argmin(score_AS, axis=1)
        go_A = (needy_load_A > limit_L[active]) & candidate_AS[ar, slot_A]
        if not go_A.any():
            break
        layers, slots = active[go_A], slot_A[go_A]
        old = phy2log_LS[layers, slots]
        donated = old >= 0
        count_LE[layers[donated], old[donated]] -= 1
        count_LE[layers, needy_A[go_A]] += 1
        phy2log_LS[layers, slots] = needy_A[go_A]
        active = layers
    return phy2log_LS


def match_to_current(new_LS: np.ndarray, current_LS: np.ndarray, slots_per_worker: int) -> np.ndarray:
    """Permute the workers (and slot indices inside each worker) of `new_LS` to overlap `current_LS`."""
    new_LS = np.asarray(new_LS, dtype=np.int64)
    current_LS = np.asarray(current_LS, dtype=np.int64)
    num_layers, num_slots = new_LS.shape
    C = slots_per_worker
    W = num_slots // C
    if num_layers == 0:
        return new_LS.copy()
    num_experts = int(max(new_LS.max(initial=-1), current_LS.max(initial=-1))) + 1
    # overlap_LWW[l, p, w] = experts of new pack p that old worker w holds: one count per
    # (new slot, old slot) pair with the same expert, found by sorting both rows by expert.
    old_order_LS = np.argsort(np.where(current_LS >= 0, current_LS, num_experts), axis=1, kind="stable")
    old_sorted_LS = np.take_along_axis(current_LS, old_order_LS, axis=1)
    layer_idx, slot_idx = np.nonzero(new_LS >= 0)
    experts = new_LS[layer_idx, slot_idx]
    flat_old = np.where(old_sorted_LS >= 0, old_sorted_LS, num_experts) + (np.arange(num_layers) * (num_experts + 1))[:, None]
    key = layer_idx * (num_experts + 1) + experts
    lo, hi = np.searchsorted(flat_old.ravel(), key, side="left"), np.searchsorted(flat_old.ravel(), key, side="right")
    reps = hi - lo
    pair_new = np.repeat(np.arange(len(key)), reps)
    pair_old = np.repeat(lo, reps) + (np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps))
    old_slot = old_order_LS.ravel()[pair_old]
    cell = (layer_idx[pair_new] * W + slot_idx[pair_new] // C) * W + old_slot // C
    overlap_LWW = np.bincount(cell, minlength=num_layers * W * W).reshape(num_layers, W, W).astype(np.float64)
    overlap_LWW += 1e-3 * np.eye(W)  # ties: keep the same worker
    pack_of_worker_LW = np.zeros((num_layers, W), dtype=np.int64)
    rows = np.arange(num_layers)
    for _ in range(W):
        flat = overlap_LWW.reshape(num_layers, -1).argmax(axis=1)
        pack, worker = np.divmod(flat, W)
        pack_of_worker_LW[rows, worker] = pack
        overlap_LWW[rows, pack, :] = -np.inf
        overlap_LWW[rows, :, worker] = -np.inf

    packs_LWC = new_LS.reshape(num_layers, W, C)[rows[:, None], pack_of_worker_LW]  # pack now on worker w
    old_LWC = current_LS.reshape(num_layers, W, C)
    same_LWCC = (packs_LWC[..., :, None] == old_LWC[..., None, :]) & (packs_LWC[..., :, None] >= 0)
    stays_LWC = same_LWCC.any(axis=3)
    old_pos_LWC = same_LWCC.argmax(axis=3)
    taken_LWC = np.zeros_like(stays_LWC)
    li, wi, ci = np.nonzero(stays_LWC)
    taken_LWC[li, wi, old_pos_LWC[li, wi, ci]] = True
    open_positions_LWC = np.argsort(taken_LWC, axis=2, kind="stable")  # untaken indices first, ascending
    mover_rank_LWC = np.cumsum(~stays_LWC, axis=2) - 1
    dest_LWC = np.where(
        stays_LWC, old_pos_LWC, np.take_along_axis(open_positions_LWC, np.maximum(mover_rank_LWC, 0), axis=2)
    )
    out_LWC = np.full_like(packs_LWC, -1)
    np.put_along_axis(out_LWC, dest_LWC, packs_LWC, axis=2)
    return out_LWC.reshape(num_layers, num_slots)

"""Migration-aware edits of a current slot map, vectorised over layers.

Legend (docs/placement.md "Shape legend"): L MoE layers, E logical experts, S slots (= W * S_w;
suffix S inside a worker), W workers, X hand-outs of one round; local to placement/: A layers
still searching, P needy experts of one layer in one round (the i-th neediest takes from the
i-th cheapest donor).

`reassign_replicas`  gives slots of surplus replicas (or free slots) to experts whose load per
                     replica is above what a fresh plan would allow; one copy per change, up to
                     `per_round` changes per layer per numpy round.
`match_to_current`   lays a freshly planned slot map over the current one: each new pack goes to
                     the worker holding most of its experts (greedy max-overlap matching), and
                     an expert that stays on a worker keeps its slot index.
"""

from __future__ import annotations

import numpy as np

from placement.layout import expert_counts, take_rows
from placement.packing import replica_counts
from placement.swaps import holds_map


def reassign_replicas(
    load_LE: np.ndarray,
    phy2log_LS: np.ndarray,
    slots_per_worker: int,
    tolerance: float = 0.0,
    fresh_count_LE: np.ndarray | None = None,
    per_round: int = 8,
    return_holds: bool = False,
) -> np.ndarray:
    """Return a copy of `phy2log_LS` (with `return_holds`: and its `swaps.holds_map`, which this
    keeps up to date anyway, so the swap search after it need not rebuild it) where, layer by layer, the expert f with the largest load per
    replica gets one more slot while that load exceeds the largest load per replica of a fresh
    replica allocation by more than `tolerance`. The slot comes from a free slot, else from the
    expert g with >= 2 replicas that loses least (smallest load_g / (count_g - 1), which must stay
    below f's load per replica); it is taken on the lightest worker that does not hold f.
    `fresh_count_LE` (the fresh allocation's replica counts) is computed when not given.

    Vectorised: each round hands out up to `per_round` replicas per layer at once, the i-th
    neediest expert taking from the i-th cheapest donor (distinct experts and donors, so the
    edits never collide); a pair waits for a later round when its donor would lose too much.
    """
    load_LE = np.asarray(load_LE, dtype=np.float64)
    phy2log_LS = np.array(phy2log_LS, dtype=np.int64, copy=True)
    num_layers, num_experts = load_LE.shape
    num_slots = phy2log_LS.shape[1]
    num_workers = num_slots // slots_per_worker
    if fresh_count_LE is None:
        fresh_count_LE = replica_counts(load_LE, num_slots, max_replicas=num_workers)
    limit_L = (load_LE / fresh_count_LE).max(axis=1) * (1 + tolerance)
    count_LE = np.ascontiguousarray(expert_counts(phy2log_LS, num_experts))
    holds_LWE = holds_map(phy2log_LS, slots_per_worker, num_experts)  # kept up to date below
    flat_holds = holds_LWE.reshape(-1)  # a view
    active = np.arange(num_layers)
    for _ in range(num_slots - num_experts):
        if len(active) == 0:
            break
        load_AE, count_AE = load_LE[active], count_LE[active]
        per_replica_AE = np.where(count_AE < num_workers, load_AE / np.maximum(count_AE, 1), -np.inf)
        wanted_A = (per_replica_AE > limit_L[active][:, None]).sum(axis=1)
        some = wanted_A > 0
        if not some.all():
            active, load_AE, count_AE, per_replica_AE, wanted_A = (
                active[some], load_AE[some], count_AE[some], per_replica_AE[some], wanted_A[some])
            if len(active) == 0:
                break
        m = int(min(per_round, wanted_A.max()))
        ar = np.arange(len(active))[:, None]
        row_AS = phy2log_LS[active]
        needy_AP = _top(-per_replica_AE, m)
        needy_load_AP = per_replica_AE[ar, needy_AP]
        loss_AE = np.where(count_AE >= 2, load_AE / np.maximum(count_AE - 1, 1), np.inf)
        loss_AE[ar, needy_AP] = np.inf
        donor_AP = _top(loss_AE, m)  # the i-th neediest expert takes from the i-th cheapest donor
        donor_ok_AP = loss_AE[ar, donor_AP] < needy_load_AP
        # candidates per worker (at most one slot of the donor per worker), from the holds map
        cell_AW1 = ((active * num_workers)[:, None] + np.arange(num_workers))[:, None, :] * (num_experts + 1)
        open_APW = ~flat_holds.take(cell_AW1 + needy_AP[:, :, None])
        free_AW = (row_AS < 0).reshape(len(active), num_workers, slots_per_worker).any(axis=2)
        has_free_A = free_AW.any(axis=1)
        # free slots go to the neediest expert only (so two experts never pick the same free slot)
        candidate_APW = open_APW & np.where(
            has_free_A[:, None, None],
            free_AW[:, None, :] & (np.arange(m) == 0)[None, :, None],
            flat_holds.take(cell_AW1 + donor_AP[:, :, None]) & donor_ok_AP[:, :, None],
        )
        # worker loads under an equal split over the current counts
        held_AS = row_AS >= 0
        per_slot_AE = load_AE * (1.0 / np.maximum(count_AE, 1))
        slot_load_AS = np.where(held_AS, take_rows(per_slot_AE, np.where(held_AS, row_AS, 0)), 0.0)
        worker_load_AW = slot_load_AS.reshape(len(active), num_workers, slots_per_worker).sum(axis=2)
        worker_AP = np.argmin(np.where(candidate_APW, worker_load_AW[:, None, :], np.inf), axis=2)  # lightest, lowest index
        go_AP = (needy_load_AP > limit_L[active][:, None]) & take_rows(candidate_APW.reshape(-1, num_workers), worker_AP.reshape(-1, 1)).reshape(worker_AP.shape)
        if not go_AP.any():
            break
        a_idx, p_idx = np.nonzero(go_AP)
        layers, workers, needy = active[a_idx], worker_AP[a_idx, p_idx], needy_AP[a_idx, p_idx]
        # the slot on that worker: its first free slot, or the donor's slot
        wanted = np.where(has_free_A[a_idx], -1, donor_AP[a_idx, p_idx])
        on_worker_XS = row_AS.reshape(len(active), num_workers, slots_per_worker)[a_idx, workers]
        slots = workers * slots_per_worker + np.argmax(on_worker_XS == wanted[:, None], axis=1)
        old = phy2log_LS[layers, slots]
        donated = old >= 0
        holds_LWE[layers[donated], workers[donated], old[donated]] = False
        holds_LWE[layers, workers, needy] = True
        count_LE[layers[donated], old[donated]] -= 1  # distinct donors per layer
        count_LE[layers, needy] += 1  # distinct (layer, expert) pairs
        phy2log_LS[layers, slots] = needy
        active = np.unique(layers)
    return (phy2log_LS, holds_LWE) if return_holds else phy2log_LS


def _top(key_AE: np.ndarray, m: int) -> np.ndarray:
    """[A, m] column indices of the m smallest keys of each row, ascending."""
    if m < key_AE.shape[1]:
        idx_AP = np.argpartition(key_AE, m - 1, axis=1)[:, :m]
    else:
        idx_AP = np.broadcast_to(np.arange(key_AE.shape[1]), key_AE.shape)
    return take_rows(idx_AP, np.argsort(take_rows(key_AE, idx_AP), axis=1, kind="stable"))


def match_to_current(new_LS: np.ndarray, current_LS: np.ndarray, slots_per_worker: int) -> np.ndarray:
    """Permute the workers (and slot indices inside each worker) of `new_LS` to overlap `current_LS`."""
    new_LS = np.asarray(new_LS, dtype=np.int64)
    current_LS = np.asarray(current_LS, dtype=np.int64)
    num_layers, num_slots = new_LS.shape
    S_w = slots_per_worker
    W = num_slots // S_w
    if num_layers == 0:
        return new_LS.copy()
    num_experts = int(max(new_LS.max(initial=-1), current_LS.max(initial=-1))) + 1
    # overlap_LWW[l, p, w] = experts of new pack p that old worker w holds: one count per
    # (new slot, old slot) pair with the same expert, found by sorting both rows by expert.
    old_order_LS = np.argsort(np.where(current_LS >= 0, current_LS, num_experts) * num_slots + np.arange(num_slots), axis=1)
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
    cell = (layer_idx[pair_new] * W + slot_idx[pair_new] // S_w) * W + old_slot // S_w
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

    packs_LWS = new_LS.reshape(num_layers, W, S_w)[rows[:, None], pack_of_worker_LW]  # pack now on worker w
    old_LWS = current_LS.reshape(num_layers, W, S_w)
    same_LWSS = (packs_LWS[..., :, None] == old_LWS[..., None, :]) & (packs_LWS[..., :, None] >= 0)
    stays_LWS = same_LWSS.any(axis=3)
    old_pos_LWS = same_LWSS.argmax(axis=3)
    taken_LWS = np.zeros_like(stays_LWS)
    li, wi, ci = np.nonzero(stays_LWS)
    taken_LWS[li, wi, old_pos_LWS[li, wi, ci]] = True
    open_positions_LWS = np.argsort(taken_LWS, axis=2, kind="stable")  # untaken indices first, ascending
    mover_rank_LWS = np.cumsum(~stays_LWS, axis=2) - 1
    dest_LWS = np.where(
        stays_LWS, old_pos_LWS, np.take_along_axis(open_positions_LWS, np.maximum(mover_rank_LWS, 0), axis=2)
    )
    out_LWS = np.full_like(packs_LWS, -1)
    np.put_along_axis(out_LWS, dest_LWS, packs_LWS, axis=2)
    return out_LWS.reshape(num_layers, num_slots)

"""Split weights of replicated experts: which fraction of an expert's tokens each replica takes.

Shapes:
    L  MoE layers    E  logical experts    S  slots    W  workers    C  slots per worker
    K  replicated experts of a layer (padded)          R  replicas of one expert (padded)

Moving tokens between replicas costs no bytes, so after the slot map is fixed the planner
re-splits every replicated expert's tokens to even out its workers. Algorithm: damped Jacobi
iterations of block coordinate descent on the sum of squared worker loads. For one expert with
total T whose replicas sit on workers with other load b_1..b_r, the best split is water-filling:
each replica gets max(0, lambda - b_i) with lambda chosen so the shares sum to T. All replicated
experts update at once (vectorised), moving half way to their water-fill; the split with the
lowest busiest worker seen is returned, so the result is never worse than the starting split.
"""

from __future__ import annotations

import numpy as np

from placement.layout import expert_counts
from placement.metrics import equal_replica_weights

_DAMPING = 0.5
_ABSENT = 1e300  # base of a padding replica: never filled (R * 1e300 stays finite)


def replicated_slots(phy2log_LS: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(slots_LKR, expert_LK): slots of every expert with >= 2 replicas, ascending; -1 padded."""
    num_layers = phy2log_LS.shape[0]
    held = phy2log_LS >= 0
    logcnt_LE = expert_counts(phy2log_LS, num_experts)
    layer_idx, slot_idx = np.nonzero(held)
    experts = phy2log_LS[layer_idx, slot_idx]
    keep = logcnt_LE[layer_idx, experts] >= 2
    layer_idx, slot_idx, experts = layer_idx[keep], slot_idx[keep], experts[keep]
    if len(layer_idx) == 0:
        return np.full((num_layers, 0, 0), -1, dtype=np.int64), np.full((num_layers, 0), -1, dtype=np.int64)
    order = np.argsort((layer_idx * num_experts + experts) * phy2log_LS.shape[1] + slot_idx)  # unique keys
    layer_idx, slot_idx, experts = layer_idx[order], slot_idx[order], experts[order]
    key = layer_idx * num_experts + experts
    new_expert = np.r_[True, key[1:] != key[:-1]]
    group_start = np.nonzero(new_expert)[0]
    group_id = np.cumsum(new_expert) - 1
    rank_in_group = np.arange(len(key)) - group_start[group_id]
    new_layer = np.r_[True, layer_idx[1:] != layer_idx[:-1]]
    first_group_of_layer = np.maximum.accumulate(np.where(new_layer, group_id, 0))
    k_index = group_id - first_group_of_layer
    num_k = int(k_index.max()) + 1
    num_r = int(rank_in_group.max()) + 1
    slots_LKR = np.full((num_layers, num_k, num_r), -1, dtype=np.int64)
    slots_LKR[layer_idx, k_index, rank_in_group] = slot_idx
    expert_LK = np.full((num_layers, num_k), -1, dtype=np.int64)
    expert_LK[layer_idx, k_index] = experts
    return slots_LKR, expert_LK


def water_fill(base_LR: np.ndarray, total_L: np.ndarray) -> np.ndarray:
    """[L, R] shares >= 0 summing to total_L that minimise sum((base + share)^2); inf base = absent.

    The level is lambda = min over k of (total + sum of the k smallest bases) / k (every k gives
    an upper bound, the filled set gives equality), so one sort of the values is all it takes.
    Absent entries count as _ABSENT (finite, so the sums stay finite and their levels huge).
    """
    padded_LR = np.minimum(base_LR, _ABSENT)
    sorted_RL = np.ascontiguousarray(np.sort(padded_LR, axis=1).T)  # rows of R: short reductions are slow
    running_L = np.asarray(total_L, dtype=np.float64).copy()
    level_L = np.full(len(running_L), np.inf)
    for k in range(len(sorted_RL)):
        running_L += sorted_RL[k]
        np.minimum(level_L, running_L / (k + 1), out=level_L)
    return np.maximum(level_L[:, None] - padded_LR, 0.0)


def balance_replica_weights(
    load_LE: np.ndarray,
    phy2log_LS: np.ndarray,
    slots_per_worker: int,
    initial_weights_LS: np.ndarray | None = None,
    sweeps: int = 16,
    min_gain: float = 1e-4,
) -> np.ndarray:
    """[L, S] split weights (sum to 1 over an expert's slots, 0 on free slots) that even out
    worker loads. Starts from `initial_weights_LS` (equal split when None). Stops after `sweeps`
    sweeps, or earlier once a sweep lowers the sum over layers of the busiest worker's load by
    less than `min_gain` of it."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    phy2log_LS = np.asarray(phy2log_LS)
    num_layers, num_experts = load_LE.shape
    weights_LS = (
        equal_replica_weights(phy2log_LS, num_experts)
        if initial_weights_LS is None
        else np.array(initial_weights_LS, dtype=np.float64)
    )
    slots_LKR, expert_LK = replicated_slots(phy2log_LS, num_experts)
    if slots_LKR.shape[1] == 0:
        return weights_LS
    held_LS = phy2log_LS >= 0
    expert_load_LS = np.where(held_LS, np.take_along_axis(load_LE, np.where(held_LS, phy2log_LS, 0), axis=1), 0.0)
    share_LS = expert_load_LS * weights_LS
    num_workers = phy2log_LS.shape[1] // slots_per_worker
    worker_load_LW = share_LS.reshape(num_layers, num_workers, slots_per_worker).sum(axis=2)
    total_LK = np.where(expert_LK >= 0, np.take_along_axis(load_LE, np.maximum(expert_LK, 0), axis=1), 0.0)
    num_k, num_r = slots_LKR.shape[1:]
    present_LKR = slots_LKR >= 0
    safe_LKR = np.where(present_LKR, slots_LKR, 0)
    layer_LKR = np.broadcast_to(np.arange(num_layers)[:, None, None], slots_LKR.shape)
    flat_worker_LKR = layer_LKR * num_workers + safe_LKR // slots_per_worker
    share_LKR = np.where(present_LKR, share_LS[layer_LKR, safe_LKR], 0.0)
    fixed_LW = worker_load_LW - np.bincount(
        flat_worker_LKR.ravel(), share_LKR.ravel(), minlength=num_layers * num_workers
    ).reshape(num_layers, num_workers)  # load of unreplicated slots
    absent_LKR = np.where(present_LKR, 0.0, _ABSENT)
    best_share_LKR = share_LKR.copy()
    best_max_L = worker_load_LW.max(axis=1)
    flat_worker_X = flat_worker_LKR.ravel()
    previous_total = np.inf
    for sweep in range(sweeps):
        load_LW = fixed_LW + np.bincount(flat_worker_X, share_LKR.ravel(), minlength=num_layers * num_workers).reshape(
            num_layers, num_workers
        )
        max_L = load_LW.max(axis=1)
        better_L = max_L < best_max_L
        best_share_LKR[better_L], best_max_L[better_L] = share_LKR[better_L], max_L[better_L]
        total = best_max_L.sum()
        if sweep >= 2 and previous_total - total <= min_gain * total:
            break
        previous_total = total
        base_LKR = load_LW.ravel()[flat_worker_LKR] - share_LKR + absent_LKR
        fill_LKR = water_fill(base_LKR.reshape(-1, num_r), total_LK.ravel()).reshape(slots_LKR.shape)
        share_LKR += _DAMPING * (fill_LKR - share_LKR)
    load_LW = fixed_LW + np.bincount(
        flat_worker_LKR.ravel(), share_LKR.ravel(), minlength=num_layers * num_workers
    ).reshape(num_layers, num_workers)
    better_L = load_LW.max(axis=1) < best_max_L
    best_share_LKR[better_L] = share_LKR[better_L]
    share_LS[layer_LKR[present_LKR], slots_LKR[present_LKR]] = best_share_LKR[present_LKR]
    with np.errstate(invalid="ignore", divide="ignore"):
        balanced_LS = np.where(expert_load_LS > 0, share_LS / expert_load_LS, weights_LS)
    return np.where(held_LS, balanced_LS, 0.0)

"""Split weights of replicated experts: which fraction of an expert's tokens each replica takes.

Legend (docs/placement.md "Shape legend"): L MoE layers, E logical experts, S slots (S_w per
worker), W workers, R replicas of one expert (padded, experts with >= 3 replicas only), X their
replica entries (`ReplicaGroups`); local to placement/: Q replicated experts, all layers.

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

from placement.layout import expert_counts, take_rows

_DAMPING = 0.5
_ABSENT = 1e300  # base of a padding replica: never filled (R * 1e300 stays finite)


class ReplicaGroups:
    """Slots of every expert with >= 2 replicas, flat, in two dense blocks (no per-expert padding
    to the largest replica count, which is 3-4x the real entries on DeepSeek layers):

        entries [0, Q2), [Q2, 2 * Q2)   first and second slot of the experts with exactly 2 replicas;
        entries [2 * Q2, X)             experts with >= 3 replicas, rows of R (-1 slot = padding).

    Per entry: `slot_X` (-1 padding), `layer_X`; per group (pairs first): `layer_Q`, `expert_Q`.
    """

    def __init__(self, phy2log_LS: np.ndarray, count_LS: np.ndarray, num_experts: int):
        num_slots = phy2log_LS.shape[1]
        flat_idx = np.flatnonzero(count_LS >= 2)  # held slots only: free slots count 0
        layer_idx, slot_idx = np.divmod(flat_idx, num_slots)
        experts = phy2log_LS.ravel().take(flat_idx)
        counts = count_LS.ravel().take(flat_idx)
        pair = counts == 2
        # pairs: sort by (layer, expert), the two slots of one expert end up side by side
        pair_layer, pair_slot, pair_expert = layer_idx[pair], slot_idx[pair], experts[pair]
        order = np.argsort((pair_layer * num_experts + pair_expert) * num_slots + pair_slot)  # unique keys
        pair_layer, pair_slot, pair_expert = pair_layer[order], pair_slot[order], pair_expert[order]
        # experts with >= 3 replicas: rows of R, ranked by slot inside the expert
        many = ~pair
        many_layer, many_slot, many_expert = layer_idx[many], slot_idx[many], experts[many]
        key = many_layer * num_experts + many_expert
        order = np.argsort(key * num_slots + many_slot)
        key, many_layer, many_slot, many_expert = key[order], many_layer[order], many_slot[order], many_expert[order]
        new_group = np.concatenate([[True], key[1:] != key[:-1]]) if len(key) else np.zeros(0, dtype=bool)
        group_start = np.nonzero(new_group)[0]
        group_id = np.cumsum(new_group) - 1
        rank = np.arange(len(key)) - group_start[group_id] if len(key) else group_id
        self.num_pairs = len(pair_slot) // 2
        self.num_many = len(group_start)
        self.many_width = int(rank.max()) + 1 if len(key) else 0
        many_slot_QR = np.full((self.num_many, self.many_width), -1, dtype=np.int64)
        many_slot_QR[group_id, rank] = many_slot
        many_layer_Q = many_layer[group_start]
        self.slot_X = np.concatenate([pair_slot[::2], pair_slot[1::2], many_slot_QR.ravel()])
        self.layer_Q = np.concatenate([pair_layer[::2], many_layer_Q])
        self.expert_Q = np.concatenate([pair_expert[::2], many_expert[group_start]])
        self.layer_X = np.concatenate([pair_layer[::2], pair_layer[::2], np.repeat(many_layer_Q, self.many_width)])

    @property
    def num_groups(self) -> int:
        return self.num_pairs + self.num_many


def water_fill(base_XR: np.ndarray, total_X: np.ndarray) -> np.ndarray:
    """[X, R] shares >= 0 summing to total_X that minimise sum((base + share)^2); inf base = absent.

    The level is lambda = min over k of (total + sum of the k smallest bases) / k (every k gives
    an upper bound, the filled set gives equality), so one sort of the values is all it takes.
    Absent entries count as _ABSENT (finite, so the sums stay finite and their levels huge).
    """
    padded_XR = np.minimum(base_XR, _ABSENT)
    sorted_RX = np.ascontiguousarray(np.sort(padded_XR, axis=1).T)  # rows of R: short reductions are slow
    running_X = np.asarray(total_X, dtype=np.float64).copy()
    level_X = np.full(len(running_X), np.inf)
    for k in range(len(sorted_RX)):
        running_X += sorted_RX[k]
        np.minimum(level_X, running_X / (k + 1), out=level_X)
    return np.maximum(level_X[:, None] - padded_XR, 0.0)


def water_fill_pairs(base_a_Q: np.ndarray, base_b_Q: np.ndarray, total_Q: np.ndarray, out_a_Q: np.ndarray, out_b_Q: np.ndarray) -> None:
    """`water_fill` of experts with exactly two replicas (bases a and b), in closed form, no sort:
    the level is min(total + lower base, (total + both bases) / 2). Writes the shares to `out_*`."""
    first_Q = total_Q + np.minimum(base_a_Q, base_b_Q)
    level_Q = np.minimum(first_Q, (first_Q + np.maximum(base_a_Q, base_b_Q)) / 2)
    np.maximum(level_Q - base_a_Q, 0.0, out=out_a_Q)
    np.maximum(level_Q - base_b_Q, 0.0, out=out_b_Q)


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
    held_LS = phy2log_LS >= 0
    expert_LS = np.where(held_LS, phy2log_LS, 0)
    count_LS = np.where(held_LS, take_rows(expert_counts(phy2log_LS, num_experts), expert_LS), 0)
    weights_LS = (
        np.where(held_LS, 1.0 / np.maximum(count_LS, 1), 0.0)  # equal split
        if initial_weights_LS is None
        else np.array(initial_weights_LS, dtype=np.float64)
    )
    groups = ReplicaGroups(phy2log_LS, count_LS, num_experts)
    if groups.num_groups == 0:
        return weights_LS
    expert_load_LS = np.where(held_LS, take_rows(load_LE, expert_LS), 0.0)
    share_LS = expert_load_LS * weights_LS
    num_workers = phy2log_LS.shape[1] // slots_per_worker
    num_cells = num_layers * num_workers
    present_X = groups.slot_X >= 0
    slot_X = np.where(present_X, groups.slot_X, 0)
    # padding entries sit on an extra cell whose load is _ABSENT: never filled, never counted
    cell_X = np.where(present_X, groups.layer_X * num_workers + slot_X // slots_per_worker, num_cells)
    share_X = np.where(present_X, share_LS[groups.layer_X, slot_X], 0.0)
    total_Q = load_LE[groups.layer_Q, groups.expert_Q]
    num_pairs = groups.num_pairs
    pair_end = 2 * num_pairs
    load_cells = np.empty(num_cells + 1)
    load_cells[num_cells] = _ABSENT
    load_LW = load_cells[:num_cells].reshape(num_layers, num_workers)  # a view: filled in place
    fixed_LW = share_LS.reshape(num_layers, num_workers, slots_per_worker).sum(axis=2) - np.bincount(
        cell_X, share_X, minlength=num_cells + 1
    )[:num_cells].reshape(num_layers, num_workers)  # load of unreplicated slots
    best_share_X = share_X.copy()
    best_max_L = np.full(num_layers, np.inf)
    fill_X = np.empty_like(share_X)
    previous_total = np.inf
    for sweep in range(sweeps + 1):
        np.add(fixed_LW, np.bincount(cell_X, share_X, minlength=num_cells + 1)[:num_cells].reshape(num_layers, num_workers), out=load_LW)
        max_L = load_LW.max(axis=1)
        better_L = max_L < best_max_L
        np.copyto(best_share_X, share_X, where=better_L[groups.layer_X])
        np.minimum(best_max_L, max_L, out=best_max_L)
        total = best_max_L.sum()
        if sweep == sweeps or (sweep >= 2 and previous_total - total <= min_gain * total):
            break
        previous_total = total
        base_X = load_cells[cell_X] - share_X  # load of the replica's worker without its own share
        water_fill_pairs(base_X[:num_pairs], base_X[num_pairs:pair_end], total_Q[:num_pairs], fill_X[:num_pairs], fill_X[num_pairs:pair_end])
        if groups.num_many:
            fill_X[pair_end:] = water_fill(
                base_X[pair_end:].reshape(-1, groups.many_width), total_Q[num_pairs:]
            ).ravel()
        share_X += _DAMPING * (fill_X - share_X)
    share_LS[groups.layer_X[present_X], groups.slot_X[present_X]] = best_share_X[present_X]
    with np.errstate(invalid="ignore", divide="ignore"):
        balanced_LS = np.where(expert_load_LS > 0, share_LS / expert_load_LS, weights_LS)
    return np.where(held_LS, balanced_LS, 0.0)

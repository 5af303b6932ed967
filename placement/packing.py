"""Replication and packing of expert replicas onto workers, vectorised over layers.

Shapes:
    L  MoE layers      E  logical experts       S  slots (= W * C)
    W  workers         C  slots per worker      I  items (replicas) to pack, I <= S
    K  candidate partner workers in one swap search

Three pieces, each a pure function:
  `replica_counts`   how many slots each expert gets (greedy on max load per replica,
                     at most one replica per worker);
  `greedy_pack`      heaviest replicas first, one per worker per round, the heaviest of a round
                     to the lightest worker (longest-processing-time with equal slot counts);
  `refine_by_swaps`  local search: swap one item of the busiest worker with one item of a light
                     worker while that lowers the pair's maximum (until a target is met). Free
                     slots are items of weight 0, so a swap with one is a plain move.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-9


def replica_counts(load_LE: np.ndarray, num_slots: int, max_replicas: int) -> np.ndarray:
    """[L, E] replicas per expert: one each, then each extra slot to the largest load per replica.

    Uses at most `min(num_slots, E * max_replicas)` slots; the rest stay free.
    """
    load_LE = np.asarray(load_LE, dtype=np.float64)
    num_layers, num_experts = load_LE.shape
    if num_slots < num_experts:
        raise ValueError(f"{num_slots} slots cannot hold {num_experts} experts")
    count_LE = np.ones((num_layers, num_experts), dtype=np.int64)
    extra = min(num_slots, num_experts * max_replicas) - num_experts
    rows = np.arange(num_layers)
    # Tiny tie-breaker so zero-load layers still spread their replicas over experts.
    tie_LE = load_LE + 1e-12 * (num_experts - np.arange(num_experts))
    for _ in range(extra):
        per_replica_LE = np.where(count_LE < max_replicas, tie_LE / count_LE, -np.inf)
        hottest_L = np.argmax(per_replica_LE, axis=1)
        count_LE[rows, hottest_L] += 1
    return count_LE


def replica_items(load_LE: np.ndarray, count_LE: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Items to pack, heaviest first: (expert_LS, weight_LS); padded with expert -1, weight 0.

    Weight of a replica = expert load / replica count. Replicas of one expert are adjacent.
    """
    num_layers, num_experts = load_LE.shape
    per_replica_LE = load_LE / count_LE
    order_LE = np.lexsort((np.broadcast_to(np.arange(num_experts), load_LE.shape), -per_replica_LE), axis=1)
    expert_LS = np.full((num_layers, num_slots), -1, dtype=np.int64)
    weight_LS = np.zeros((num_layers, num_slots))
    for layer in range(num_layers):
        experts = np.repeat(order_LE[layer], count_LE[layer, order_LE[layer]])
        expert_LS[layer, : len(experts)] = experts
        weight_LS[layer, : len(experts)] = per_replica_LE[layer, experts]
    return expert_LS, weight_LS


def greedy_pack(expert_LI: np.ndarray, weight_LI: np.ndarray, num_workers: int, slots_per_worker: int) -> np.ndarray:
    """Place items (heaviest first) onto workers in rounds; returns phy2log_LS.

    Round r hands the next W items, heaviest first, to the workers sorted lightest first (each
    worker gets one item per round, so every worker ends with C slots). An item whose expert the
    chosen worker already holds trades places with a neighbour in the round when that clears the
    clash; `repair_duplicates` removes any clash left. Items with expert -1 are free slots.
    """
    num_layers, num_items = expert_LI.shape
    num_slots = num_workers * slots_per_worker
    expert_LS = np.full((num_layers, num_slots), -1, dtype=np.int64)
    weight_LS = np.zeros((num_layers, num_slots))
    expert_LS[:, :num_items] = expert_LI[:, :num_slots]
    weight_LS[:, :num_items] = weight_LI[:, :num_slots]
    rows = np.arange(num_layers)[:, None]
    phy2log_LWC = np.full((num_layers, num_workers, slots_per_worker), -1, dtype=np.int64)
    worker_load_LW = np.zeros((num_layers, num_workers))
    for rank in range(slots_per_worker):
        lo = rank * num_workers
        experts_LW = expert_LS[:, lo : lo + num_workers]
        weights_LW = weight_LS[:, lo : lo + num_workers]
        workers_LW = np.argsort(worker_load_LW, axis=1, kind="stable")  # item i -> i-th lightest
        if rank > 0:
            for _ in range(2):
                held_LW = (phy2log_LWC[rows, workers_LW, :rank] == experts_LW[..., None]).any(axis=2) & (experts_LW >= 0)
                if not held_LW.any():
                    break
                # swap the clashing item's worker with the next item's (or the previous one's at the end)
                li, wi = np.nonzero(held_LW)
                partner = np.where(wi + 1 < num_workers, wi + 1, wi - 1)
                a, b = workers_LW[li, wi].copy(), workers_LW[li, partner].copy()
                workers_LW[li, wi], workers_LW[li, partner] = b, a
        phy2log_LWC[rows, workers_LW, rank] = experts_LW
        worker_load_LW[rows, workers_LW] += weights_LW
    return phy2log_LWC.reshape(num_layers, num_slots)


def repair_duplicates(phy2log_LS: np.ndarray, slots_per_worker: int, num_experts: int) -> np.ndarray:
    """Swap away any second copy of an expert on one worker (returns a fixed copy).

    The duplicate is exchanged with a slot of another worker whose expert is not on this worker
    and which does not hold the duplicated expert.
    """
    phy2log_LS = phy2log_LS.copy()
    num_layers, num_slots = phy2log_LS.shape
    num_workers = num_slots // slots_per_worker
    sorted_LWC = np.sort(phy2log_LS.reshape(num_layers, num_workers, slots_per_worker), axis=2)
    clash_L = ((sorted_LWC[..., 1:] == sorted_LWC[..., :-1]) & (sorted_LWC[..., 1:] >= 0)).any(axis=(1, 2))
    for layer in np.nonzero(clash_L)[0]:
        row_WC = phy2log_LS[layer].reshape(num_workers, slots_per_worker)  # view into the copy
        for worker in range(num_workers):
            seen: set[int] = set()
            for rank in range(slots_per_worker):
                expert = int(row_WC[worker, rank])
                if expert < 0 or expert not in seen:
                    seen.add(expert)
                    continue
                for other in range(num_workers):
                    if other == worker or expert in row_WC[other]:
                        continue
                    ok = [r for r in range(slots_per_worker) if row_WC[other, r] < 0 or row_WC[other, r] not in seen]
                    if ok:
                        row_WC[worker, rank], row_WC[other, ok[0]] = row_WC[other, ok[0]], expert
                        if row_WC[worker, rank] >= 0:
                            seen.add(int(row_WC[worker, rank]))
                        break
                else:
                    raise ValueError(f"layer {layer}: cannot place expert {expert} without a duplicate")
    return phy2log_LS


def refine_by_swaps(
    phy2log_LS: np.ndarray,
    slot_weight_LS: np.ndarray,
    slots_per_worker: int,
    num_experts: int,
    target_LAYERS: np.ndarray | None = None,
    max_swaps: int = 200,
    num_partners: int = 8,
    active_LAYERS: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local search on the busiest worker of each layer; returns (phy2log_LS, slot_weight_LS, swaps_L).

    Each round swaps one slot of the busiest worker `a` with one slot of one of the
    `num_partners` lightest workers `b`, choosing the swap with the smallest max(new a, new b)
    that is below a's load and breaks no invariant (no expert twice on one worker). A layer
    stops when its busiest worker is at or below `target_LAYERS` (tokens; default 0 = keep going
    while it improves), when no swap improves, or after `max_swaps` swaps. Items keep their
    weight when they move (a slot's weight is its share of its expert's tokens).
    """
    phy2log_LS = phy2log_LS.copy()
    slot_weight_LS = np.asarray(slot_weight_LS, dtype=np.float64).copy()
    num_layers, num_slots = phy2log_LS.shape
    num_workers = num_slots // slots_per_worker
    C = slots_per_worker
    K = min(num_partners, num_workers - 1)
    swaps_L = np.zeros(num_layers, dtype=np.int64)
    if K < 1 or num_layers == 0:
        return phy2log_LS, slot_weight_LS, swaps_L
    target_L = np.zeros(num_layers) if target_LAYERS is None else np.asarray(target_LAYERS, dtype=np.float64)
    # holds_LWE[l, w, e]: worker w holds expert e; column E is the free slot (never "held").
    holds_LWE = np.zeros((num_layers, num_workers, num_experts + 1), dtype=bool)
    layer_idx, slot_idx = np.nonzero(phy2log_LS >= 0)
    holds_LWE[layer_idx, slot_idx // C, phy2log_LS[layer_idx, slot_idx]] = True
    worker_load_LW = slot_weight_LS.reshape(num_layers, num_workers, C).sum(axis=2)
    active = np.arange(num_layers) if active_LAYERS is None else np.nonzero(active_LAYERS)[0]
    for _ in range(max_swaps):
        if len(active) == 0:
            break
        load_AW = worker_load_LW[active]
        busiest_A = np.argmax(load_AW, axis=1)
        busiest_load_A = load_AW[np.arange(len(active)), busiest_A]
        keep = busiest_load_A > target_L[active] * (1 + _EPS)
        active, load_AW, busiest_A, busiest_load_A = active[keep], load_AW[keep], busiest_A[keep], busiest_load_A[keep]
        if len(active) == 0:
            break
        n_act = len(active)
        ar = np.arange(n_act)
        others_AW = load_AW.copy()
        others_AW[ar, busiest_A] = np.inf  # never partner with itself
        if K < num_workers - 1:
            partners_AK = np.argpartition(others_AW, K - 1, axis=1)[:, :K]
        else:
            partners_AK = np.argsort(others_AW, axis=1)[:, :K]
        expert_LWC = phy2log_LS.reshape(num_layers, num_workers, C)  # views: writes go through
        weight_LWC = slot_weight_LS.reshape(num_layers, num_workers, C)
        weight_a_AC = weight_LWC[active, busiest_A]
        weight_b_AKC = weight_LWC[active[:, None], partners_AK]
        expert_a_AC = expert_LWC[active, busiest_A]
        expert_b_AKC = expert_LWC[active[:, None], partners_AK]
        col_a_AC = np.where(expert_a_AC >= 0, expert_a_AC, num_experts)
        col_b_AKC = np.where(expert_b_AKC >= 0, expert_b_AKC, num_experts)
        a_on_b_AKC = holds_LWE[active[:, None, None], partners_AK[:, :, None], col_a_AC[:, None, :]]
        b_on_a_AKC = holds_LWE[active[:, None, None], busiest_A[:, None, None], col_b_AKC]
        load_b_AK = load_AW[ar[:, None], partners_AK]
        delta_AKCC = weight_a_AC[:, None, :, None] - weight_b_AKC[:, :, None, :]
        new_max_AKCC = np.maximum(busiest_load_A[:, None, None, None] - delta_AKCC, load_b_AK[:, :, None, None] + delta_AKCC)
        legal = (delta_AKCC > _EPS) & ~a_on_b_AKC[:, :, :, None] & ~b_on_a_AKC[:, :, None, :]
        new_max_AKCC = np.where(legal, new_max_AKCC, np.inf)
        flat = new_max_AKCC.reshape(n_act, -1)
        best = np.argmin(flat, axis=1)
        improves = flat[ar, best] < busiest_load_A * (1 - _EPS)
        if not improves.any():
            break
        best_k, best_ca, best_cb = np.unravel_index(best, (K, C, C))
        sel = np.nonzero(improves)[0]
        layers = active[sel]
        worker_a, worker_b = busiest_A[sel], partners_AK[sel, best_k[sel]]
        slot_a, slot_b = worker_a * C + best_ca[sel], worker_b * C + best_cb[sel]
        expert_a, expert_b = phy2log_LS[layers, slot_a], phy2log_LS[layers, slot_b]
        weight_a, weight_b = slot_weight_LS[layers, slot_a], slot_weight_LS[layers, slot_b]
        phy2log_LS[layers, slot_a], phy2log_LS[layers, slot_b] = expert_b, expert_a
        slot_weight_LS[layers, slot_a], slot_weight_LS[layers, slot_b] = weight_b, weight_a
        col_a = np.where(expert_a >= 0, expert_a, num_experts)
        col_b = np.where(expert_b >= 0, expert_b, num_experts)
        holds_LWE[layers, worker_a, col_a] = False
        holds_LWE[layers, worker_b, col_b] = False
        holds_LWE[layers, worker_a, col_b] = expert_b >= 0
        holds_LWE[layers, worker_b, col_a] = expert_a >= 0
        worker_load_LW[layers, worker_a] += weight_b - weight_a
        worker_load_LW[layers, worker_b] += weight_a - weight_b
        swaps_L[layers] += 1
        active = layers
    return phy2log_LS, slot_weight_LS, swaps_L

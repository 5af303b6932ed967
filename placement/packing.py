"""Replication and packing of expert replicas onto workers, vectorised over layers.

Legend (docs/architecture.md): L MoE layers, E logical experts, S slots (= W * S_w), W workers,
S_w slots per worker (suffix S inside a worker: `phy2log_LWS`); local: I items (replicas) to pack,
I <= S.

Three pieces, each a pure function:
  `replica_counts`   how many slots each expert gets (greedy on max load per replica,
                     at most one replica per worker);
  `greedy_pack`      heaviest replicas first, one per worker per round, the heaviest of a round
                     to the lightest worker (longest-processing-time with equal slot counts);
  `repair_duplicates` swaps away any second copy of an expert on one worker.
The swap local search that follows the packing lives in `placement.swaps`.
"""

from __future__ import annotations

import numpy as np

from placement.swaps import refine_by_swaps  # noqa: F401  (re-exported: it used to live here)

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
    if extra <= 0:
        return count_LE
    # Tiny tie-breaker so zero-load layers still spread their replicas over experts.
    tie_LE = load_LE + 1e-12 * (num_experts - np.arange(num_experts))
    # Handing each extra slot to the largest load per replica = taking the `extra` largest
    # quotients load / k (the (k+1)-th replica, k = 1 .. max_replicas - 1); only the `extra`
    # heaviest experts can win one.
    top = min(num_experts, extra)
    hot_LH = np.argpartition(-tie_LE, top - 1, axis=1)[:, :top] if top < num_experts else np.broadcast_to(
        np.arange(num_experts), (num_layers, num_experts))
    hot_load_LH = np.take_along_axis(tie_LE, hot_LH, axis=1)
    # The `extra` quotients load / 1 of the hot experts bound the threshold from below by the
    # smallest hot load, so no expert wins more than max load / that replicas.
    most = min(max_replicas - 1, extra)
    if top == extra:
        ratio = float((hot_load_LH.max(axis=1) / np.maximum(hot_load_LH.min(axis=1), 1e-300)).max())
        most = int(min(most, np.floor(ratio) + 1))
    divisors_K = np.arange(1, most + 1, dtype=np.float64)
    quotient_LX = (hot_load_LH[:, :, None] / divisors_K).reshape(num_layers, -1)
    winners_LX = np.argpartition(-quotient_LX, extra - 1, axis=1)[:, :extra]
    won_LX = np.take_along_axis(hot_LH, winners_LX // len(divisors_K), axis=1) + (np.arange(num_layers) * num_experts)[:, None]
    count_LE += np.bincount(won_LX.ravel(), minlength=num_layers * num_experts).reshape(num_layers, num_experts)
    return count_LE


def replica_items(load_LE: np.ndarray, count_LE: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Items to pack, heaviest first: (expert_LS, weight_LS); padded with expert -1, weight 0.

    Weight of a replica = expert load / replica count. Replicas of one expert are adjacent.
    """
    num_layers = load_LE.shape[0]
    per_replica_LE = load_LE / count_LE
    order_LE = np.argsort(-per_replica_LE, axis=1, kind="stable")
    count_sorted_LE = np.take_along_axis(count_LE, order_LE, axis=1)
    layer_of = np.repeat(np.arange(num_layers), count_sorted_LE.sum(axis=1))
    experts = np.repeat(order_LE.ravel(), count_sorted_LE.ravel())
    layer_start = np.r_[0, np.cumsum(count_sorted_LE.sum(axis=1))[:-1]]
    position = np.arange(len(experts)) - layer_start[layer_of]
    expert_LS = np.full((num_layers, num_slots), -1, dtype=np.int64)
    weight_LS = np.zeros((num_layers, num_slots))
    expert_LS[layer_of, position] = experts
    weight_LS[layer_of, position] = per_replica_LE[layer_of, experts]
    return expert_LS, weight_LS


def greedy_pack(expert_LI: np.ndarray, weight_LI: np.ndarray, num_workers: int, slots_per_worker: int) -> np.ndarray:
    """Place items (heaviest first) onto workers in rounds; returns phy2log_LS.

    Round r hands the next W items, heaviest first, to the workers sorted lightest first (each
    worker gets one item per round, so every worker ends with S_w slots). An item whose expert the
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
    phy2log_LWS = np.full((num_layers, num_workers, slots_per_worker), -1, dtype=np.int64)
    worker_load_LW = np.zeros((num_layers, num_workers))
    for rank in range(slots_per_worker):
        lo = rank * num_workers
        experts_LW = expert_LS[:, lo : lo + num_workers]
        weights_LW = weight_LS[:, lo : lo + num_workers]
        workers_LW = np.argsort(worker_load_LW, axis=1, kind="stable")  # item i -> i-th lightest
        if rank > 0:
            for _ in range(2):
                held_LW = (phy2log_LWS[rows, workers_LW, :rank] == experts_LW[..., None]).any(axis=2) & (experts_LW >= 0)
                if not held_LW.any():
                    break
                # swap the clashing item's worker with the next item's (or the previous one's at the end)
                li, wi = np.nonzero(held_LW)
                partner = np.where(wi + 1 < num_workers, wi + 1, wi - 1)
                a, b = workers_LW[li, wi].copy(), workers_LW[li, partner].copy()
                workers_LW[li, wi], workers_LW[li, partner] = b, a
        phy2log_LWS[rows, workers_LW, rank] = experts_LW
        worker_load_LW[rows, workers_LW] += weights_LW
    return phy2log_LWS.reshape(num_layers, num_slots)


def repair_duplicates(phy2log_LS: np.ndarray, slots_per_worker: int, num_experts: int) -> np.ndarray:
    """Swap away any second copy of an expert on one worker (returns a fixed copy).

    The duplicate is exchanged with a slot of another worker whose expert is not on this worker
    and which does not hold the duplicated expert.
    """
    phy2log_LS = phy2log_LS.copy()
    num_layers, num_slots = phy2log_LS.shape
    num_workers = num_slots // slots_per_worker
    sorted_LWS = np.sort(phy2log_LS.reshape(num_layers, num_workers, slots_per_worker), axis=2)
    clash_L = ((sorted_LWS[..., 1:] == sorted_LWS[..., :-1]) & (sorted_LWS[..., 1:] >= 0)).any(axis=(1, 2))
    for layer in np.nonzero(clash_L)[0]:
        row_WS = phy2log_LS[layer].reshape(num_workers, slots_per_worker)  # view into the copy
        for worker in range(num_workers):
            seen: set[int] = set()
            for rank in range(slots_per_worker):
                expert = int(row_WS[worker, rank])
                if expert < 0 or expert not in seen:
                    seen.add(expert)
                    continue
                for other in range(num_workers):
                    if other == worker or expert in row_WS[other]:
                        continue
                    ok = [r for r in range(slots_per_worker) if row_WS[other, r] < 0 or row_WS[other, r] not in seen]
                    if ok:
                        row_WS[worker, rank], row_WS[other, ok[0]] = row_WS[other, ok[0]], expert
                        if row_WS[worker, rank] >= 0:
                            seen.add(int(row_WS[worker, rank]))
                        break
                else:
                    raise ValueError(f"layer {layer}: cannot place expert {expert} without a duplicate")
    return phy2log_LS

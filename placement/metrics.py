"""Load metrics of a placement: per-slot rows and compute, per-worker loads, the imbalance of each layer.

Legend: L MoE layers, E logical experts, S slots (S_w per worker), W workers.

An expert's tokens split over its replicas by `replica_weights_LS` (the token share of each slot's
replica; equal split when not given). Every shard of a replica receives all of the replica's rows
and computes `shard_width` of each (placement.shards), so
    rows of a slot    = expert load x replica weight,
    compute of a slot = rows x width            (in whole-expert rows; = rows without shards).
Worker loads and the imbalance are computed on compute: max over workers / mean over workers
(1.0 is perfect). Without shards compute and rows are the same numbers as before shards existed.
"""

from __future__ import annotations

import numpy as np

from placement.layout import Placement, expert_counts, take_rows


def equal_replica_weights(phy2log_LS: np.ndarray, num_experts: int, shard_width_LS: np.ndarray | None = None) -> np.ndarray:
    """[L, S] float: 1 / (replicas of the slot's expert); 0 for free slots. Replicas are slots
    for whole experts, and the sum of the expert's widths with shards."""
    phy2log_LS = np.asarray(phy2log_LS)
    held = phy2log_LS >= 0
    if shard_width_LS is None:
        replicas_LE = expert_counts(phy2log_LS, num_experts)
    else:
        flat_LS = np.where(held, phy2log_LS + (np.arange(len(phy2log_LS)) * num_experts)[:, None], len(phy2log_LS) * num_experts)
        sums = np.bincount(flat_LS.ravel(), np.asarray(shard_width_LS, dtype=np.float64).ravel(), minlength=flat_LS.size + 1)
        replicas_LE = np.rint(sums[: len(phy2log_LS) * num_experts]).reshape(len(phy2log_LS), num_experts)
    replicas_LS = take_rows(replicas_LE, np.where(held, phy2log_LS, 0))
    return np.where(held, 1.0 / np.maximum(replicas_LS, 1), 0.0)


def slot_rows(load_LE: np.ndarray, phy2log_LS: np.ndarray, replica_weights_LS: np.ndarray | None = None,
              shard_width_LS: np.ndarray | None = None) -> np.ndarray:
    """[L, S] float rows (routed (token, k) pairs) each slot receives; 0 for free slots."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    phy2log_LS = np.asarray(phy2log_LS)
    if replica_weights_LS is None:
        replica_weights_LS = equal_replica_weights(phy2log_LS, load_LE.shape[1], shard_width_LS)
    held = phy2log_LS >= 0
    expert_load_LS = take_rows(load_LE, np.where(held, phy2log_LS, 0))
    return np.where(held, expert_load_LS * replica_weights_LS, 0.0)


def slot_loads(load_LE: np.ndarray, phy2log_LS: np.ndarray, replica_weights_LS: np.ndarray | None = None,
               shard_width_LS: np.ndarray | None = None) -> np.ndarray:
    """[L, S] float compute each slot does, in whole-expert rows (= rows without shards)."""
    rows_LS = slot_rows(load_LE, phy2log_LS, replica_weights_LS, shard_width_LS)
    return rows_LS if shard_width_LS is None else rows_LS * np.asarray(shard_width_LS, dtype=np.float64)


def per_worker(values_LS: np.ndarray, slots_per_worker: int) -> np.ndarray:
    """[L, W] sum of a per-slot quantity over each worker's slots."""
    num_layers, num_slots = values_LS.shape
    return values_LS.reshape(num_layers, num_slots // slots_per_worker, slots_per_worker).sum(axis=2)


def worker_loads(
    load_LE: np.ndarray, phy2log_LS: np.ndarray, slots_per_worker: int, replica_weights_LS: np.ndarray | None = None,
    shard_width_LS: np.ndarray | None = None,
) -> np.ndarray:
    """[L, W] float compute each worker does (whole-expert rows; = rows received without shards)."""
    return per_worker(slot_loads(load_LE, phy2log_LS, replica_weights_LS, shard_width_LS), slots_per_worker)


def worker_rows(
    load_LE: np.ndarray, phy2log_LS: np.ndarray, slots_per_worker: int, replica_weights_LS: np.ndarray | None = None,
    shard_width_LS: np.ndarray | None = None,
) -> np.ndarray:
    """[L, W] float rows each worker receives (what the exchange carries; shards get every row)."""
    return per_worker(slot_rows(load_LE, phy2log_LS, replica_weights_LS, shard_width_LS), slots_per_worker)


def imbalance_of_worker_loads(worker_load_LW: np.ndarray) -> np.ndarray:
    """[L] max / mean over workers; 1.0 for a layer with no tokens."""
    mean_L = worker_load_LW.mean(axis=1)
    max_L = worker_load_LW.max(axis=1)
    return np.where(mean_L > 0, max_L / np.where(mean_L > 0, mean_L, 1.0), 1.0)


def imbalance(load_LE: np.ndarray, placement: Placement, replica_weights: np.ndarray | None = None) -> np.ndarray:
    """[L] per-layer compute imbalance of `placement` under `load_LE`.

    `replica_weights` is [L, S] (token share of each slot's replica); when None, the placement's
    own `replica_weights`, else an equal split. Shard widths come from the placement.
    """
    if replica_weights is None:
        replica_weights = placement.replica_weights
    return imbalance_of_worker_loads(
        worker_loads(load_LE, placement.phy2log, placement.slots_per_worker, replica_weights, placement.shard_width)
    )


def surviving_load_after_worker_loss(load_LE: np.ndarray, placement: Placement) -> np.ndarray:
    """[W] fraction of the routed load (all layers) whose expert keeps a whole live copy when
    worker w is lost: some replica of it has none of its slots (whole or shard) on w. 1.0 = a
    single loss never needs the checkpoint; the minimum over w is the worst single loss."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    phy2log_LS, replica_LS = placement.phy2log, placement.replica_of_slot
    num_layers, num_slots = phy2log_LS.shape
    worker_S = np.arange(num_slots) // placement.slots_per_worker
    total = load_LE.sum()
    surviving_W = np.zeros(placement.num_workers)
    for lost in range(placement.num_workers):
        for layer in range(num_layers):
            used = phy2log_LS[layer] >= 0
            # (expert, replica) pairs with a slot on the lost worker are broken
            broken = {(int(e), int(r)) for e, r, w in zip(phy2log_LS[layer][used], replica_LS[layer][used],
                                                         worker_S[used]) if w == lost}
            alive = {(int(e), int(r)) for e, r in zip(phy2log_LS[layer][used], replica_LS[layer][used])} - broken
            experts_alive = sorted({e for e, _ in alive})
            surviving_W[lost] += load_LE[layer, experts_alive].sum()
    return surviving_W / total if total > 0 else np.ones(placement.num_workers)

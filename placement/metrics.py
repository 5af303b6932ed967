"""Load metrics of a placement: per-slot and per-worker tokens, and the imbalance of each layer.

Shapes:
    L  MoE layers    E  logical experts    S  slots    W  workers

Imbalance of a layer = max over workers of the tokens its slots get / mean over workers (1.0 is
perfect). An expert's tokens split over its replicas by `replica_weights_LS` (the fraction of
its expert's tokens each slot takes); equal split when not given.
"""

from __future__ import annotations

import numpy as np

from placement.layout import Placement, expert_counts, take_rows


def equal_replica_weights(phy2log_LS: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, S] float: 1 / (number of slots of the slot's expert); 0 for free slots."""
    phy2log_LS = np.asarray(phy2log_LS)
    held = phy2log_LS >= 0
    logcnt_LE = expert_counts(phy2log_LS, num_experts)
    count_LS = take_rows(logcnt_LE, np.where(held, phy2log_LS, 0))
    return np.where(held, 1.0 / np.maximum(count_LS, 1), 0.0)


def slot_loads(load_LE: np.ndarray, phy2log_LS: np.ndarray, replica_weights_LS: np.ndarray | None = None) -> np.ndarray:
    """[L, S] float tokens each slot receives (0 for free slots)."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    phy2log_LS = np.asarray(phy2log_LS)
    if replica_weights_LS is None:
        replica_weights_LS = equal_replica_weights(phy2log_LS, load_LE.shape[1])
    held = phy2log_LS >= 0
    expert_load_LS = take_rows(load_LE, np.where(held, phy2log_LS, 0))
    return np.where(held, expert_load_LS * replica_weights_LS, 0.0)


def worker_loads(
    load_LE: np.ndarray, phy2log_LS: np.ndarray, slots_per_worker: int, replica_weights_LS: np.ndarray | None = None
) -> np.ndarray:
    """[L, W] float tokens each worker receives."""
    per_slot_LS = slot_loads(load_LE, phy2log_LS, replica_weights_LS)
    num_layers, num_slots = per_slot_LS.shape
    return per_slot_LS.reshape(num_layers, num_slots // slots_per_worker, slots_per_worker).sum(axis=2)


def imbalance_of_worker_loads(worker_load_LW: np.ndarray) -> np.ndarray:
    """[L] max / mean over workers; 1.0 for a layer with no tokens."""
    mean_L = worker_load_LW.mean(axis=1)
    max_L = worker_load_LW.max(axis=1)
    return np.where(mean_L > 0, max_L / np.where(mean_L > 0, mean_L, 1.0), 1.0)


def imbalance(load_LE: np.ndarray, placement: Placement, replica_weights: np.ndarray | None = None) -> np.ndarray:
    """[L] per-layer imbalance of `placement` under `load_LE`.

    `replica_weights` is [L, S] (fraction of its expert's tokens each slot takes); equal split
    over an expert's replicas when None.
    """
    return imbalance_of_worker_loads(
        worker_loads(load_LE, placement.phy2log, placement.slots_per_worker, replica_weights)
    )

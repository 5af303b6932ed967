"""Per-batch split of a replicated expert's tokens across its replicas (reference for the device).

Shapes:
    T  tokens in the batch    K  experts per token (top-k)
    E  logical experts        R  max replicas (log2phy padding)
    L  MoE layers             S  slots

Rule (`split_to_slots`), deterministic and vectorisable with sort / cumsum / searchsorted only:
for a (token, k) pair routed to expert e, let j be its occurrence rank among this batch's pairs
routed to e, in flattened row-major (token, k) order, and c_e the batch count for e. With
W_e = cumsum of e's replica weights in ascending slot order (log2phy order; last entry = 1),
the pair goes to replica r = number of entries of W_e[:-1] that are <= (j + 0.5) / c_e, clipped
to logcnt_e - 1 (a guard against weights that sum to slightly less than 1 in floating point).
Each replica then receives its weight's share of the batch within one token, so per-step worker
loads follow the planner's split even for a small batch.

Baseline (`mod_split`): replica = token index mod logcnt_e ("position mod replicas").
"""

from __future__ import annotations

import numpy as np


def occurrence_rank(ids_N: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(rank_N, count_E): rank of each entry among equal ids (in order), and count of each id."""
    order_N = np.argsort(ids_N, kind="stable")
    sorted_N = ids_N[order_N]
    first_N = np.searchsorted(sorted_N, sorted_N, side="left")
    rank_N = np.empty_like(ids_N)
    rank_N[order_N] = np.arange(len(ids_N)) - first_N
    return rank_N, np.bincount(ids_N, minlength=num_experts)


def split_to_slots(topk_ids_TK: np.ndarray, log2phy_ER: np.ndarray, replica_weights_ER: np.ndarray) -> np.ndarray:
    """[T, K] slot of each (token, k) pair of one layer, by the rule in the module docstring.

    `replica_weights_ER` holds each expert's replica weights in log2phy order, 0 padded.
    """
    topk_ids_TK = np.asarray(topk_ids_TK, dtype=np.int64)
    log2phy_ER = np.asarray(log2phy_ER, dtype=np.int64)
    num_experts = log2phy_ER.shape[0]
    ids_N = topk_ids_TK.ravel()
    rank_N, count_E = occurrence_rank(ids_N, num_experts)
    position_N = (rank_N + 0.5) / count_E[ids_N]
    cumulative_ER = np.cumsum(np.asarray(replica_weights_ER, dtype=np.float64), axis=1)
    replica_N = (cumulative_ER[ids_N, :-1] <= position_N[:, None]).sum(axis=1)
    logcnt_E = (log2phy_ER >= 0).sum(axis=1)
    replica_N = np.minimum(replica_N, logcnt_E[ids_N] - 1)
    return log2phy_ER[ids_N, replica_N].reshape(topk_ids_TK.shape)


def mod_split(topk_ids_TK: np.ndarray, log2phy_ER: np.ndarray) -> np.ndarray:
    """[T, K] baseline: replica = token index mod the expert's replica count."""
    topk_ids_TK = np.asarray(topk_ids_TK, dtype=np.int64)
    logcnt_E = (np.asarray(log2phy_ER) >= 0).sum(axis=1)
    token_T1 = np.arange(topk_ids_TK.shape[0])[:, None]
    return np.asarray(log2phy_ER)[topk_ids_TK, token_T1 % logcnt_E[topk_ids_TK]]


def replica_weights_by_expert(replica_weights_LS: np.ndarray, log2phy_LER: np.ndarray) -> np.ndarray:
    """[L, E, R] split weights in log2phy order (0 where log2phy is -1) from the planner's [L, S]."""
    log2phy_LER = np.asarray(log2phy_LER)
    layer_L11 = np.arange(log2phy_LER.shape[0])[:, None, None]
    gathered = np.asarray(replica_weights_LS)[layer_L11, np.maximum(log2phy_LER, 0)]
    return np.where(log2phy_LER >= 0, gathered, 0.0)


def step_imbalance(slot_ids_TK: np.ndarray, num_slots: int, slots_per_worker: int) -> float:
    """Max / mean tokens over workers for one batch's slot assignment."""
    per_worker = np.bincount(np.ravel(slot_ids_TK), minlength=num_slots).reshape(-1, slots_per_worker).sum(axis=1)
    mean = per_worker.mean()
    return float(per_worker.max() / mean) if mean > 0 else 1.0

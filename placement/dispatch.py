"""Planned-weights split of a replicated expert's tokens across its replicas (reference for the device).

Legend: T tokens in the batch, K top-k, E logical experts, R max replicas (log2phy padding),
L MoE layers, S slots, X any number of rows ((token, k) pairs, or (batch, expert) rows).

This is the fallback of the per-batch split (placement.batch_split), which re-splits every batch
from its own counts; this rule only needs the planner's weights.

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


def occurrence_rank(ids_X: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(rank_X, count_E): rank of each entry among equal ids (in order), and count of each id."""
    order_X = np.argsort(ids_X, kind="stable")
    sorted_X = ids_X[order_X]
    first_X = np.searchsorted(sorted_X, sorted_X, side="left")
    rank_X = np.empty_like(ids_X)
    rank_X[order_X] = np.arange(len(ids_X)) - first_X
    return rank_X, np.bincount(ids_X, minlength=num_experts)


def split_to_slots(topk_ids_TK: np.ndarray, log2phy_ER: np.ndarray, replica_weights_ER: np.ndarray) -> np.ndarray:
    """[T, K] slot of each (token, k) pair of one layer, by the rule in the module docstring.

    `replica_weights_ER` holds each expert's replica weights in log2phy order, 0 padded.
    """
    topk_ids_TK = np.asarray(topk_ids_TK, dtype=np.int64)
    log2phy_ER = np.asarray(log2phy_ER, dtype=np.int64)
    num_experts = log2phy_ER.shape[0]
    ids_X = topk_ids_TK.ravel()
    rank_X, count_E = occurrence_rank(ids_X, num_experts)
    position_X = (rank_X + 0.5) / count_E[ids_X]
    cumulative_ER = np.cumsum(np.asarray(replica_weights_ER, dtype=np.float64), axis=1)
    replica_X = (cumulative_ER[ids_X, :-1] <= position_X[:, None]).sum(axis=1)
    logcnt_E = (log2phy_ER >= 0).sum(axis=1)
    replica_X = np.minimum(replica_X, logcnt_E[ids_X] - 1)
    return log2phy_ER[ids_X, replica_X].reshape(topk_ids_TK.shape)


def rule_counts(count_X: np.ndarray, weights_XR: np.ndarray, num_replicas_X: np.ndarray) -> np.ndarray:
    """[X, R] int64: how many of an expert's `count_X` pairs `split_to_slots` sends to each of its
    `num_replicas_X` replicas (weights in replica order, 0 padded), without looking at any pair.

    Pair j goes to a replica past i iff cum_i <= (j + 0.5) / c, so the pairs up to replica i are
    B_i = #{j < c : (j + 0.5) / c < cum_i}. The guess ceil(c * cum_i - 0.5) is corrected with the
    rule's own division, so the counts equal a bincount of `split_to_slots` bit for bit.
    """
    count_X = np.asarray(count_X, dtype=np.int64)
    weights_XR = np.asarray(weights_XR, dtype=np.float64)
    num_rows, max_replicas = weights_XR.shape
    valid_X = np.maximum(np.asarray(num_replicas_X, dtype=np.int64), 1)
    cum_XR = np.cumsum(weights_XR, axis=1)[:, :-1]
    c_X1 = np.maximum(count_X, 1)[:, None].astype(np.float64)
    guess_XR = np.clip(np.ceil(c_X1 * cum_XR - 0.5), 0, count_X[:, None]).astype(np.int64)
    for _ in range(2):  # move the guess onto the rule's exact boundary (floating point differs by < 1 pair)
        lower = (guess_XR > 0) & ((guess_XR - 1 + 0.5) / c_X1 >= cum_XR)
        guess_XR -= lower
        higher = (guess_XR < count_X[:, None]) & ((guess_XR + 0.5) / c_X1 < cum_XR)
        guess_XR += higher
    clipped_XR = np.arange(max_replicas - 1)[None, :] >= valid_X[:, None] - 1  # the rule clips to the last replica
    bounds_XR = np.where(clipped_XR, count_X[:, None], guess_XR)
    bounds_XR = np.concatenate([np.zeros((num_rows, 1), dtype=np.int64), bounds_XR, count_X[:, None]], axis=1)
    return np.diff(np.maximum.accumulate(bounds_XR, axis=1), axis=1)


def rows_from_weights(counts_XE: np.ndarray, log2phy_XER: np.ndarray, replica_weights_XER: np.ndarray,
                      num_slots: int) -> np.ndarray:
    """[X, S] int64 rows each slot gets from `split_to_slots` for batches with these per-expert
    counts (rows X = batches or layers; log2phy / weights per row, weights 0 padded)."""
    counts_XE = np.asarray(counts_XE, dtype=np.int64)
    num_rows, num_experts = counts_XE.shape
    log2phy_XER = np.asarray(log2phy_XER)
    per_replica = rule_counts(counts_XE.ravel(), np.asarray(replica_weights_XER, dtype=np.float64).reshape(num_rows * num_experts, -1),
                              (log2phy_XER >= 0).sum(axis=2).ravel())
    rows_XS = np.zeros((num_rows, num_slots + 1), dtype=np.int64)
    slots_XER = np.where(log2phy_XER >= 0, log2phy_XER, num_slots)
    np.add.at(rows_XS, (np.arange(num_rows)[:, None, None], slots_XER), per_replica.reshape(log2phy_XER.shape))
    return rows_XS[:, :num_slots]


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

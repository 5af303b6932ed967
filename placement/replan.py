"""Migration-aware re-plan of every layer of a current slot map, vectorised over layers.

Legend (docs/architecture.md): L MoE layers, E logical experts, S slots (= W * S_w),
W workers, S_w slots per worker (`spw`).

Tolerances are relative to the imbalance a fresh plan of the layer would reach. A fresh plan
costs more than the whole re-plan should, so it is run lazily: with redundant slots (S > E) the
reference starts at a lower bound of the fresh plan,

    bound = max(1, max_e load_e / fresh_count_e / mean worker load),

(some replica of expert e takes >= load_e / count_e, whatever the split weights), and the fresh
plan stops within `fresh_slack` (0.1%) of perfect, so with redundancy it is almost always within
0.1% of the bound. A decision taken against the bound is also right against the fresh plan
(keep: kept imbalance <= bound * (1 + tol) <= fresh * (1 + tol)). The fresh plan runs only for
the layers the bound cannot decide:
  - layers whose keep check lands within `fresh_slack` above bound * (1 + keep_tolerance);
  - layers whose incremental edit misses bound * (1 + target_tolerance): for these the fresh
    imbalance decides again (kept / edit again, from the current slots, towards the fresh
    plan's imbalance / take the fresh plan), exactly as when the fresh plan runs first.
The bound is loose without redundancy (S = E), when hierarchical, and when items are coarse (a
replica above LAZY_MAX_ITEM of the mean worker load, e.g. Mixtral's 8 experts on 8 workers): such
layers get their fresh plan first, as before (lazy there moved 31% of EPLB's bytes on Mixtral
8 x 16 instead of 26%).
"""

from __future__ import annotations

import numpy as np

from placement.layout import take_rows
from placement.metrics import equal_replica_weights, imbalance_of_worker_loads, slot_loads, worker_loads
from placement.packing import replica_counts
from placement.reassign import match_to_current, reassign_replicas
from placement.replica_weights import balance_replica_weights
from placement.swaps import refine_by_swaps

LAZY_MAX_ITEM = 0.5  # lazy fresh plans only where the largest replica is <= this x mean worker load


def fresh_lower_bound(load_LE: np.ndarray, count_LE: np.ndarray, num_workers: int) -> np.ndarray:
    """[L] imbalance no plan with these replica counts can beat (any split weights)."""
    mean_L = load_LE.sum(axis=1) / num_workers
    top_L = (load_LE / np.maximum(count_LE, 1)).max(axis=1)
    return np.where(mean_L > 0, np.maximum(1.0, top_L / np.where(mean_L > 0, mean_L, 1.0)), 1.0)


class _LazyFresh:
    """Fresh plans of single layers, computed on first use and cached: (phy2log, weights, imbalance)."""

    def __init__(self, load_LE, topology, fresh_fn):
        self.load_LE, self.topology, self.fresh_fn = load_LE, topology, fresh_fn
        num_layers, num_slots = load_LE.shape[0], topology.num_slots
        self.phy2log_LS = np.full((num_layers, num_slots), -1, dtype=np.int64)
        self.weights_LS = np.zeros((num_layers, num_slots))
        self.imbalance_L = np.full(num_layers, np.nan)
        self.known_L = np.zeros(num_layers, dtype=bool)

    def ensure(self, layers: np.ndarray) -> np.ndarray:
        """Fresh imbalance of `layers` (planning the unknown ones now, all in one call)."""
        todo = layers[~self.known_L[layers]]
        if len(todo):
            spw = self.topology.slots_per_worker
            phy2log_LS, weights_LS = self.fresh_fn(self.load_LE[todo])
            self.phy2log_LS[todo], self.weights_LS[todo] = phy2log_LS, weights_LS
            self.imbalance_L[todo] = imbalance_of_worker_loads(worker_loads(self.load_LE[todo], phy2log_LS, spw, weights_LS))
            self.known_L[todo] = True
        return self.imbalance_L[layers]


def replan_layers(load_LE, current_LS, topology, options, fresh_fn):
    """(phy2log_LS, weights_LS, kept_L, reference_imbalance_L) for a re-plan from `current_LS`.

    `fresh_fn(load_XE) -> (phy2log_XS, weights_XS)` plans rows from scratch. The reference is the
    fresh plan's imbalance where it was run, else the lower bound the layer was decided against.
    """
    num_layers, num_experts = load_LE.shape
    spw, num_workers, num_slots = topology.slots_per_worker, topology.num_workers, topology.num_slots
    fresh = _LazyFresh(load_LE, topology, fresh_fn)
    all_layers = np.arange(num_layers)
    phy2log_LS, weights_LS = current_LS.copy(), np.zeros((num_layers, num_slots))
    kept_L = np.zeros(num_layers, dtype=bool)
    if not options.migration_aware:
        fallback = all_layers
        reference_L = fresh.ensure(all_layers)
    else:
        count_LE = replica_counts(load_LE, num_slots, max_replicas=num_workers)
        reference_L = fresh_lower_bound(load_LE, count_LE, num_workers)
        # the bound is near-tight only with spare slots and items small against a worker's share
        mean_L = load_LE.sum(axis=1) / num_workers
        lazy_L = (load_LE / np.maximum(count_LE, 1)).max(axis=1) <= LAZY_MAX_ITEM * mean_L
        lazy_L &= num_slots > num_experts and not options.hierarchical
        eager = np.nonzero(~lazy_L)[0]
        reference_L[eager] = fresh.ensure(eager)
        lazy = bool(lazy_L.any())
        keep_weights_LS = balance_replica_weights(load_LE, current_LS, spw, sweeps=options.weight_sweeps)
        keep_imb_L = imbalance_of_worker_loads(worker_loads(load_LE, current_LS, spw, keep_weights_LS))
        keep_limit_L = reference_L * (1 + options.keep_tolerance)
        if lazy:  # the bound cannot tell: ask the fresh plan
            unsure = np.nonzero(lazy_L & (keep_imb_L > keep_limit_L) & (keep_imb_L <= keep_limit_L * (1 + options.fresh_slack)))[0]
            reference_L[unsure] = fresh.ensure(unsure)
        kept_L = keep_imb_L <= reference_L * (1 + options.keep_tolerance)
        redo = np.nonzero(~kept_L)[0]
        fallback = redo[:0]
        if len(redo):
            inc_LS, inc_w_LS, inc_imb_L = incremental(
                load_LE[redo], current_LS[redo], keep_weights_LS[redo], reference_L[redo], count_LE[redo], topology, options
            )
            within = 1 + options.target_tolerance
            good = inc_imb_L <= reference_L[redo] * within * (1 + 1e-9)
            retry_X = ~good & ~fresh.known_L[redo]  # decided against the bound only
            missed = redo[retry_X]
            if len(missed):  # decide again against the fresh plan itself, and edit towards it
                reference_L[missed] = fresh.ensure(missed)
                kept_L[missed] = keep_imb_L[missed] <= reference_L[missed] * (1 + options.keep_tolerance)
                again = np.nonzero(retry_X & ~kept_L[redo])[0]
                if len(again):
                    rows = redo[again]
                    inc_LS[again], inc_w_LS[again], inc_imb_L[again] = incremental(
                        load_LE[rows], current_LS[rows], keep_weights_LS[rows], reference_L[rows], count_LE[rows], topology, options
                    )
                good = ~kept_L[redo] & (inc_imb_L <= reference_L[redo] * within * (1 + 1e-9))
            phy2log_LS[redo[good]], weights_LS[redo[good]] = inc_LS[good], inc_w_LS[good]
            fallback = redo[~good & ~kept_L[redo]]
        weights_LS[kept_L] = keep_weights_LS[kept_L]
    if len(fallback):  # the fresh plan, its packs matched to the current workers and slots
        fresh.ensure(fallback)
        matched_LS = match_to_current(fresh.phy2log_LS[fallback], current_LS[fallback], spw)
        phy2log_LS[fallback] = matched_LS
        weights_LS[fallback] = permute_weights(fresh.phy2log_LS[fallback], fresh.weights_LS[fallback], matched_LS)
    return phy2log_LS, weights_LS, kept_L, reference_L


def _weights_from_slot_tokens(load_LE, phy2log_LS, slot_tokens_LS, fallback_LS):
    held = phy2log_LS >= 0
    expert_load_LS = np.where(held, take_rows(load_LE, np.where(held, phy2log_LS, 0)), 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(held, np.where(expert_load_LS > 0, slot_tokens_LS / expert_load_LS, fallback_LS), 0.0)


def _warm_weights(current_LS, current_weights_LS, phy2log_LS, num_experts):
    """Weights of the current slots carried over where an expert kept exactly its slots; equal
    split for experts whose slots changed."""
    num_layers = phy2log_LS.shape[0]
    changed_LE = np.zeros((num_layers, num_experts + 1), dtype=bool)
    layer_idx, slot_idx = np.nonzero(phy2log_LS != current_LS)
    changed_LE[layer_idx, np.where(phy2log_LS[layer_idx, slot_idx] >= 0, phy2log_LS[layer_idx, slot_idx], num_experts)] = True
    changed_LE[layer_idx, np.where(current_LS[layer_idx, slot_idx] >= 0, current_LS[layer_idx, slot_idx], num_experts)] = True
    col_LS = np.where(phy2log_LS >= 0, phy2log_LS, num_experts)
    return np.where(take_rows(changed_LE, col_LS), equal_replica_weights(phy2log_LS, num_experts), current_weights_LS)


def incremental(load_LE, current_LS, current_weights_LS, reference_L, count_LE, topology, options):
    """Edit rows of `current_LS` with few copies towards `reference_L * (1 + target_tolerance)`:
    (phy2log_LS, weights_LS, imbalance_L). `count_LE` are the fresh plan's replica counts.

    Layers whose edit meets the target and copies more than `options.edit_variants_min_copies` of
    their slots are edited again by every `options.edit_variants` (reassign tolerance, copy penalty) and take the
    variant with the fewest copies among those whose imbalance is no worse than the first edit's.
    """
    first = _edit(load_LE, current_LS, current_weights_LS, reference_L, count_LE, topology, options, options.target_tolerance, 0.0)
    if not options.edit_variants:
        return first
    best_LS, best_w_LS, best_imb_L = first  # updated in place; `limit_L` keeps the first edit's imbalance
    limit_L = best_imb_L * (1 + 1e-12)
    copies_L = slot_copies(current_LS, best_LS)
    # only edits that copy much and already meet the target (a missed one takes the fresh plan)
    met_L = best_imb_L <= reference_L * (1 + options.target_tolerance) * (1 + 1e-9)
    rows = np.nonzero((copies_L > options.edit_variants_min_copies * current_LS.shape[1]) & met_L)[0]
    for reassign_tolerance, copy_penalty in options.edit_variants if len(rows) else ():
        cand_LS, cand_w_LS, cand_imb_L = _edit(
            load_LE[rows], current_LS[rows], current_weights_LS[rows], reference_L[rows], count_LE[rows], topology, options,
            reassign_tolerance, copy_penalty,
        )
        cand_copies_L = slot_copies(current_LS[rows], cand_LS)
        take = (cand_copies_L < copies_L[rows]) & (cand_imb_L <= limit_L[rows])
        won = rows[take]
        best_LS[won], best_w_LS[won], best_imb_L[won], copies_L[won] = cand_LS[take], cand_w_LS[take], cand_imb_L[take], cand_copies_L[take]
    return best_LS, best_w_LS, best_imb_L


def slot_copies(current_LS: np.ndarray, new_LS: np.ndarray) -> np.ndarray:
    """[L] whole-slot copies from `current_LS` to `new_LS` (slots whose expert changed to one)."""
    return ((new_LS != current_LS) & (new_LS >= 0)).sum(axis=1)


def _edit(load_LE, current_LS, current_weights_LS, reference_L, count_LE, topology, options, reassign_tolerance, copy_penalty):
    """One edit of `incremental`: replica hand-outs within `reassign_tolerance` of the fresh
    allocation's largest load per replica, then the swap search, each swap's change in copies
    priced at `copy_penalty` x the mean worker load (0: the best balance only)."""
    spw = topology.slots_per_worker
    num_experts = load_LE.shape[1]
    phy2log_LS, holds_LWE = reassign_replicas(load_LE, current_LS, spw, reassign_tolerance, fresh_count_LE=count_LE, return_holds=True)
    weights_LS = _warm_weights(current_LS, current_weights_LS, phy2log_LS, num_experts)
    mean_L = load_LE.sum(axis=1) / topology.num_workers
    target_L = reference_L * (1 + options.target_tolerance) * mean_L
    phy2log_LS, tokens_LS, _ = refine_by_swaps(
        phy2log_LS, slot_loads(load_LE, phy2log_LS, weights_LS), spw, num_experts,
        target_LAYERS=target_L, max_swaps=options.max_swaps, num_partners=options.num_partners,
        parallel=options.swap_parallel, holds_LWE=holds_LWE,
        origin_LS=current_LS if copy_penalty > 0 else None, copy_penalty_LAYERS=copy_penalty * mean_L,
    )
    weights_LS = _weights_from_slot_tokens(load_LE, phy2log_LS, tokens_LS, equal_replica_weights(phy2log_LS, num_experts))
    weights_LS = balance_replica_weights(load_LE, phy2log_LS, spw, weights_LS, sweeps=options.weight_sweeps)
    imb_L = imbalance_of_worker_loads(worker_loads(load_LE, phy2log_LS, spw, weights_LS))
    return phy2log_LS, weights_LS, imb_L


def permute_weights(from_LS: np.ndarray, weights_LS: np.ndarray, to_LS: np.ndarray) -> np.ndarray:
    """Weights of `from_LS` carried to `to_LS`, a per-layer permutation of the same (expert) multiset.

    Replicas of one expert are interchangeable, so the k-th slot of expert e in `to` takes the
    weight of the k-th slot of e in `from`.
    """
    num_slots = from_LS.shape[1]
    src_order_LS = np.argsort(from_LS * num_slots + np.arange(num_slots), axis=1)  # by expert, then slot
    dst_order_LS = np.argsort(to_LS * num_slots + np.arange(num_slots), axis=1)
    out_LS = np.zeros_like(weights_LS)
    np.put_along_axis(out_LS, dst_order_LS, np.take_along_axis(weights_LS, src_order_LS, axis=1), axis=1)
    return out_LS

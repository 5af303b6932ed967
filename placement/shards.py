"""Sharded experts: slot widths, the replicas they form, and each shard's columns.

Legend (docs/architecture.md): L layers, E experts, S slots (S_w per worker), W workers,
R replicas, F an expert's FFN width, X any number of rows.

A slot holds `width` of its expert's FFN width F (1.0 = the whole expert, the default). A shard
of width w holds a contiguous range of F: gate/up columns and down rows [start, stop) * F. An
expert's slots, in ascending slot order, form its replicas: consecutive slots whose widths add up
to exactly 1 are one replica (a whole slot is a replica on its own). So an expert's widths add up
to its replica count R_e, and a token routed to replica r is sent to every shard of r; each shard
returns a partial output and the weighted combine sums them. Replicas and shards mix freely: two
replicas of 3 shards each, or a whole replica next to one of two shards. Invariants
(`check_widths`): held slots have 0 < width <= 1, free slots width 0, and no replica ends inside a
slot. No worker holds two slots of one expert (Placement.validate), so a replica's shards sit on
distinct workers.

Pure numpy; vectorised over layers.
"""

from __future__ import annotations

import numpy as np

WIDTH_TOLERANCE = 1e-9  # widths are float fractions; sums of shards are equal to 1 within this
_TIE_TOLERANCE = 1e-6  # in columns: fraction x F this close below a half rounds down (shard_columns)


def rank_in_runs(sorted_keys_X: np.ndarray) -> np.ndarray:
    """[X] int64 position of each entry inside its run of equal keys (keys sorted, or at least
    grouped): 0 for a run's first entry. Position minus the run's start, no binary search."""
    sorted_keys_X = np.asarray(sorted_keys_X)
    if len(sorted_keys_X) == 0:
        return np.zeros(0, dtype=np.int64)
    position_X = np.arange(len(sorted_keys_X))
    first_X = np.r_[True, sorted_keys_X[1:] != sorted_keys_X[:-1]]
    return position_X - np.maximum.accumulate(np.where(first_X, position_X, 0))


def whole_widths(phy2log_LS: np.ndarray) -> np.ndarray:
    """[L, S] float: 1.0 for held slots, 0.0 for free ones (a placement without shards)."""
    return (np.asarray(phy2log_LS) >= 0).astype(np.float64)


def _expert_slot_order(phy2log_LS: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, S] slot indices sorted by (expert, slot) per layer; free slots last."""
    num_slots = phy2log_LS.shape[1]
    key_LS = np.where(phy2log_LS >= 0, phy2log_LS, num_experts) * num_slots + np.arange(num_slots)
    return np.argsort(key_LS, axis=1)


def replica_structure(phy2log_LS: np.ndarray, width_LS: np.ndarray, num_experts: int):
    """(replica_LS, start_LS, stop_LS, num_replicas_LE) of a slot map with widths.

    replica_LS: index of the slot's replica within its expert (0 .. R_e - 1; -1 free).
    start_LS, stop_LS: the slot's column range as fractions of F (0 <= start < stop <= 1).
    num_replicas_LE: R_e, the (integer) sum of the expert's widths.

    Computed from one cumulative sum of widths per expert in slot order, so the stop of one shard
    and the start of the next are the same float (`shard_columns` turns them into equal integers).
    Raises ValueError when a replica would end inside a slot or an expert's widths do not add up
    to a whole number.
    """
    phy2log_LS = np.asarray(phy2log_LS, dtype=np.int64)
    width_LS = np.asarray(width_LS, dtype=np.float64)
    num_layers, num_slots = phy2log_LS.shape
    held_LS = phy2log_LS >= 0
    order_LS = _expert_slot_order(phy2log_LS, num_experts)
    expert_sorted_LS = np.take_along_axis(np.where(held_LS, phy2log_LS, num_experts), order_LS, axis=1)
    width_sorted_LS = np.take_along_axis(np.where(held_LS, width_LS, 0.0), order_LS, axis=1)
    # cumulative width inside each run of one expert (segmented cumsum: global cumsum minus the run's base)
    cumulative_LS = np.cumsum(width_sorted_LS, axis=1)
    new_run_LS = np.ones_like(held_LS)
    new_run_LS[:, 1:] = expert_sorted_LS[:, 1:] != expert_sorted_LS[:, :-1]
    before_LS = np.zeros_like(cumulative_LS)  # the previous slot's cumulative sum, exactly (not cumsum - width)
    before_LS[:, 1:] = cumulative_LS[:, :-1]
    run_base_LS = np.maximum.accumulate(np.where(new_run_LS, before_LS, -np.inf), axis=1)
    end_LS = cumulative_LS - run_base_LS  # width of the expert's slots up to and including this one
    begin_LS = before_LS - run_base_LS  # == the previous slot's end_LS inside a run, bit for bit
    replica_sorted_LS = np.floor(begin_LS + WIDTH_TOLERANCE).astype(np.int64)
    held_sorted_LS = expert_sorted_LS < num_experts
    crosses = held_sorted_LS & (np.floor(end_LS - WIDTH_TOLERANCE) > replica_sorted_LS)
    if crosses.any():
        layer, position = map(int, np.argwhere(crosses)[0])
        raise ValueError(
            f"layer {layer}: slot {int(order_LS[layer, position])} (expert {int(expert_sorted_LS[layer, position])}) "
            f"spans columns {begin_LS[layer, position]:.6f}..{end_LS[layer, position]:.6f}: a replica must end at a slot boundary"
        )
    start_LS, stop_LS = np.zeros((num_layers, num_slots)), np.zeros((num_layers, num_slots))
    replica_LS = np.full((num_layers, num_slots), -1, dtype=np.int64)
    np.put_along_axis(start_LS, order_LS, np.where(held_sorted_LS, begin_LS - replica_sorted_LS, 0.0), axis=1)
    np.put_along_axis(stop_LS, order_LS, np.where(held_sorted_LS, end_LS - replica_sorted_LS, 0.0), axis=1)
    np.put_along_axis(replica_LS, order_LS, np.where(held_sorted_LS, replica_sorted_LS, -1), axis=1)
    total_LE = np.zeros((num_layers, num_experts + 1))
    np.add.at(total_LE, (np.arange(num_layers)[:, None], expert_sorted_LS), width_sorted_LS)
    total_LE = total_LE[:, :num_experts]
    num_replicas_LE = np.rint(total_LE).astype(np.int64)
    off = np.abs(total_LE - num_replicas_LE) > WIDTH_TOLERANCE * np.maximum(1, num_replicas_LE)
    if off.any():
        layer, expert = map(int, np.argwhere(off)[0])
        raise ValueError(f"layer {layer}: expert {expert}'s shard widths add up to {total_LE[layer, expert]:.6f}, "
                         "not a whole number of replicas")
    return replica_LS, start_LS, stop_LS, num_replicas_LE


def check_widths(phy2log_LS: np.ndarray, width_LS: np.ndarray) -> None:
    """Raise ValueError naming the first slot whose width is out of range (0 < width <= 1 held, 0 free)."""
    phy2log_LS, width_LS = np.asarray(phy2log_LS), np.asarray(width_LS, dtype=np.float64)
    if width_LS.shape != phy2log_LS.shape:
        raise ValueError(f"shard_width has shape {width_LS.shape}, phy2log {phy2log_LS.shape}")
    held_LS = phy2log_LS >= 0
    bad_LS = np.where(held_LS, (width_LS <= 0) | (width_LS > 1 + WIDTH_TOLERANCE), width_LS != 0)
    if bad_LS.any():
        layer, slot = map(int, np.argwhere(bad_LS)[0])
        kind = "held" if held_LS[layer, slot] else "free"
        raise ValueError(f"layer {layer}: {kind} slot {slot} has width {width_LS[layer, slot]} "
                         f"({'need 0 < width <= 1' if kind == 'held' else 'a free slot has width 0'})")


def shard_columns(start_LS: np.ndarray, stop_LS: np.ndarray, ffn_width: int) -> np.ndarray:
    """[L, S, 2] int64 column range [start, stop) of F held by each slot (free slots: [0, 0)).

    Rounds the fraction boundaries to the nearest column, halves down, with a tolerance: two
    fractions within float noise of each other (0.1 + 0.6 and 0.3 + 0.4 of F = 15, on either side of
    the tie 10.5) give the same column, so two placements whose boundaries agree within
    WIDTH_TOLERANCE agree on columns too. Adjacent shards share one boundary value
    (`replica_structure`), so a replica's shards tile [0, F) exactly, with no gap or overlap.
    """
    def column(fraction):
        return np.floor(np.asarray(fraction, dtype=np.float64) * ffn_width + 0.5 - _TIE_TOLERANCE)

    return np.stack([column(start_LS), column(stop_LS)], axis=-1).astype(np.int64)


def replica_weights_are_shared(phy2log_LS: np.ndarray, replica_LS: np.ndarray, weights_LS: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, S] bool: the slot's token share equals that of the first shard of its replica (shards
    of one replica must take the same tokens, since each token goes to all of them)."""
    num_layers, num_slots = phy2log_LS.shape
    held_LS = phy2log_LS >= 0
    max_replicas = int(replica_LS.max(initial=0)) + 1
    key_LS = np.where(held_LS, phy2log_LS * max_replicas + replica_LS, num_experts * max_replicas)
    first_LX = np.full((num_layers, num_experts * max_replicas + 1), np.nan)
    order_LS = np.argsort(key_LS * num_slots + np.arange(num_slots), axis=1)[:, ::-1]  # last write = lowest slot
    rows_L1 = np.arange(num_layers)[:, None]
    first_LX[rows_L1, np.take_along_axis(key_LS, order_LS, axis=1)] = np.take_along_axis(weights_LS, order_LS, axis=1)
    return ~held_LS | np.isclose(weights_LS, first_LX[rows_L1, key_LS], rtol=1e-9, atol=1e-12)

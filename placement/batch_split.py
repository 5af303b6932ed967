"""Per-batch split of replicated experts' rows across their replicas (numpy reference for the device).

Legend (docs/architecture.md): B batches, L MoE layers, E experts, S slots (S_w per worker),
W workers, R replicas of one expert, T tokens, K top-k, X any number of rows (the slots of
single-replica experts, flat); local to placement/ (docs/placement.md): Q replicated (layer, expert)
groups, flat over layers, J shards of one replica.

The planner's split weights fit the load of a window; one batch is much less balanced. Every
worker knows the batch's global per-expert counts after routing (one small all-reduce), so every
worker can compute the same split of this batch, with no host sync, and route by it:

    rows_BLS = split_batch(units, counts_BLE, planned_weights_LS)

1. Rows that cannot move: an expert with one replica puts its count on each of that replica's
   slots (each shard gets every row and computes `width` of each).
2. Damped Jacobi water-filling, as placement.replica_weights but on this batch's counts, from the
   planned split: every sweep, each replicated expert water-fills its count over its replicas
   given the other load of their workers, and moves half way there; the split with the lowest
   busiest worker seen is kept. A replica of several shards is levelled by its busiest shard.
3. Integer rows: each replica gets the floor of its share; the rows left over go one each to the
   largest fractional parts (ties to the lower replica index), so every expert's rows add up to
   its count exactly: no pair is dropped or sent twice.
4. Integer moves: a few rounds, each moving, per (batch, layer), rows of one replicated expert
   from the busiest worker to its least loaded other replica, the move that leaves the lowest pair
   maximum (rounding in step 3 can put two rounded-up replicas on one worker, and a few sweeps
   of Jacobi leave slack where a worker holds many replicated experts).
5. Never worse than the fallback: per (batch, layer), the planned weights' rows (the rule of
   placement.dispatch) are kept where they leave a lower busiest worker.

Deterministic: a fixed number of sweeps, stable sorts, no data-dependent order; the same counts
and placement give the same rows on every worker (a device twin must keep every reduction in a
fixed order: segment sums by sorted cumsum, not atomics).

Routing by the split (`pairs_to_slots`): a pair of expert e with occurrence rank j (its position
among the batch's pairs routed to e, flattened row-major (token, k) order) goes to the replica r
with cum_{r-1} <= j < cum_r, cum = cumsum of e's rows per replica in replica order, and to every
shard of it. Each replica then receives exactly its rows.
"""

from __future__ import annotations

import numpy as np

from placement.dispatch import occurrence_rank, rule_counts
from placement.shards import rank_in_runs, replica_structure, whole_widths

_DAMPING = 0.5
_ABSENT = 1e300  # level of a padding replica: never filled (R * 1e300 stays finite)


class ReplicaUnits:
    """A layout's slots sorted into what moves per batch and what does not (built once per placement).

    Replicated experts (>= 2 replicas), flat over layers, padded to R replicas of J shards:
        layer_Q, expert_Q; slot_QRJ (-1 padding), width_QRJ (0 padding), present_QR.
    Single-replica experts' slots: fixed_layer_X, fixed_slot_X, fixed_expert_X, fixed_width_X.
    """

    def __init__(self, phy2log_LS: np.ndarray, slots_per_worker: int, num_experts: int, width_LS: np.ndarray | None = None):
        phy2log_LS = np.asarray(phy2log_LS, dtype=np.int64)
        width_LS = whole_widths(phy2log_LS) if width_LS is None else np.asarray(width_LS, dtype=np.float64)
        self.num_layers, self.num_slots = phy2log_LS.shape
        self.num_experts, self.slots_per_worker = num_experts, slots_per_worker
        self.num_workers = self.num_slots // slots_per_worker
        self.phy2log_LS, self.width_LS = phy2log_LS, width_LS
        replica_LS, _, _, self.num_replicas_LE = replica_structure(phy2log_LS, width_LS, num_experts)
        self.replica_LS = replica_LS
        layer_X, slot_X = np.nonzero(phy2log_LS >= 0)
        expert_X, replica_X, width_X = phy2log_LS[layer_X, slot_X], replica_LS[layer_X, slot_X], width_LS[layer_X, slot_X]
        moves_X = self.num_replicas_LE[layer_X, expert_X] >= 2
        fixed = ~moves_X
        self.fixed_layer_X, self.fixed_slot_X = layer_X[fixed], slot_X[fixed]
        self.fixed_expert_X, self.fixed_width_X = expert_X[fixed], width_X[fixed]
        # replicated slots, sorted by (layer, expert, replica, slot): groups, then replicas, then shards
        layer_X, slot_X, expert_X, replica_X, width_X = (a[moves_X] for a in (layer_X, slot_X, expert_X, replica_X, width_X))
        order = np.lexsort((slot_X, replica_X, expert_X, layer_X))
        layer_X, slot_X, expert_X, replica_X, width_X = (a[order] for a in (layer_X, slot_X, expert_X, replica_X, width_X))
        group_key = layer_X * num_experts + expert_X
        new_group = np.r_[True, group_key[1:] != group_key[:-1]] if len(group_key) else np.zeros(0, dtype=bool)
        group_X = np.cumsum(new_group) - 1
        shard_X = rank_in_runs(group_key * (self.num_slots + 1) + replica_X)
        self.num_groups = int(new_group.sum())
        self.max_replicas = int(replica_X.max(initial=-1)) + 1
        self.max_shards = int(shard_X.max(initial=-1)) + 1
        shape = (self.num_groups, max(self.max_replicas, 1), max(self.max_shards, 1))
        self.slot_QRJ = np.full(shape, -1, dtype=np.int64)
        self.width_QRJ = np.zeros(shape)
        self.slot_QRJ[group_X, replica_X, shard_X] = slot_X
        self.width_QRJ[group_X, replica_X, shard_X] = width_X
        self.layer_Q, self.expert_Q = layer_X[new_group], expert_X[new_group]
        self.present_QR = self.slot_QRJ[:, :, 0] >= 0
        # a replica is levelled by its widest shard: the rate at which its rows raise that worker
        self.rate_QR = np.where(self.present_QR, self.width_QRJ.max(axis=2), 1.0)
        # groups by replica count, for the sweeps (no padding to the largest count: ~80% of the
        # replicated experts have 2 replicas on DeepSeek layers, a few have 8-10)
        count_Q = self.present_QR.sum(axis=1)
        self.blocks = [(np.flatnonzero(count_Q == r), int(r)) for r in np.unique(count_Q)]

    @classmethod
    def of(cls, placement) -> ReplicaUnits:
        return cls(placement.phy2log, placement.slots_per_worker, placement.num_experts, placement.shard_width)

    def cell_QRJ(self) -> np.ndarray:
        """[Q, R, J] flat (layer, worker) cell of each shard; padding -> the extra cell L * W."""
        worker_QRJ = np.where(self.slot_QRJ >= 0, self.slot_QRJ // self.slots_per_worker, 0)
        cell = self.layer_Q[:, None, None] * self.num_workers + worker_QRJ
        return np.where(self.slot_QRJ >= 0, cell, self.num_layers * self.num_workers)

    def replica_weights_QR(self, weights_LS: np.ndarray | None) -> np.ndarray:
        """[Q, R] token share of each replica (its first shard's weight); equal split when None."""
        if weights_LS is None:
            return np.where(self.present_QR, 1.0 / np.maximum(self.present_QR.sum(axis=1, keepdims=True), 1), 0.0)
        weights_LS = np.asarray(weights_LS, dtype=np.float64)
        first_QR = np.maximum(self.slot_QRJ[:, :, 0], 0)
        return np.where(self.present_QR, weights_LS[self.layer_Q[:, None], first_QR], 0.0)


def water_fill_rates(base_XR: np.ndarray, rate_XR: np.ndarray, total_X: np.ndarray) -> np.ndarray:
    """[X, R] shares >= 0 summing to total_X that level base + share * rate (rate > 0).

    Shares are (level - base) / rate where positive; level = min over k of
    (total + sum_{i <= k} base_i / rate_i) / sum_{i <= k} 1 / rate_i over the bases in ascending
    order (the minimum is reached at the filled set). Base _ABSENT = a padding replica.
    """
    base_XR = np.minimum(base_XR, _ABSENT)
    total_X = np.asarray(total_X, dtype=np.float64)
    if base_XR.shape[1] == 2:  # closed form, no sort: level = min(one filled, both filled)
        speed_XR = 1.0 / rate_XR
        low = base_XR[:, 0] <= base_XR[:, 1]
        b_lo, b_hi = np.where(low, base_XR[:, 0], base_XR[:, 1]), np.where(low, base_XR[:, 1], base_XR[:, 0])
        s_lo, s_hi = np.where(low, speed_XR[:, 0], speed_XR[:, 1]), np.where(low, speed_XR[:, 1], speed_XR[:, 0])
        one_X = b_lo + total_X / s_lo
        both_X = (total_X + b_lo * s_lo + b_hi * s_hi) / (s_lo + s_hi)
        level_X = np.minimum(one_X, both_X)
        return np.maximum(level_X[:, None] - base_XR, 0.0) * speed_XR
    order_XR = np.argsort(base_XR, axis=1, kind="stable")
    sorted_base_XR = np.take_along_axis(base_XR, order_XR, axis=1)
    speed_XR = 1.0 / np.take_along_axis(rate_XR, order_XR, axis=1)  # rows per unit of level
    level_XR = (total_X[:, None] + np.cumsum(sorted_base_XR * speed_XR, axis=1)) / np.cumsum(speed_XR, axis=1)
    level_X = level_XR.min(axis=1)
    return np.maximum(level_X[:, None] - base_XR, 0.0) / rate_XR


def _cell_sums(values_BX: np.ndarray, cell_X: np.ndarray, num_cells: int) -> np.ndarray:
    """[B, num_cells] sum of values_BX[:, x] into cell_X[x] for every batch row (one bincount)."""
    num_batches = values_BX.shape[0]
    flat = (np.arange(num_batches)[:, None] * num_cells + cell_X[None, :]).ravel()
    return np.bincount(flat, values_BX.ravel(), minlength=num_batches * num_cells).reshape(num_batches, num_cells)


def integer_rows(share_XR: np.ndarray, total_X: np.ndarray, present_XR: np.ndarray) -> np.ndarray:
    """[X, R] int64 rows: floor of each share, the remainder to the largest fractional parts
    (ties to the lower index) among present replicas; every row adds up to total_X exactly."""
    share_XR = np.where(present_XR, np.maximum(share_XR, 0.0), 0.0)
    floor_XR = np.floor(share_XR).astype(np.int64)
    left_X = np.asarray(total_X, dtype=np.int64) - floor_XR.sum(axis=1)
    # float shares sum to the total within rounding: the remainder is in [0, R); clip guards the rest
    fraction_XR = np.where(present_XR, share_XR - floor_XR, -np.inf)
    rank_XR = np.empty_like(floor_XR)
    order_XR = np.argsort(-fraction_XR, axis=1, kind="stable")
    np.put_along_axis(rank_XR, order_XR, np.broadcast_to(np.arange(share_XR.shape[1]), share_XR.shape), axis=1)
    rows_XR = floor_XR + (rank_XR < left_X[:, None])
    excess_X = rows_XR.sum(axis=1) - total_X  # > 0 only if the floors overshot (shares above the total)
    if (excess_X > 0).any():
        top_X = np.argmax(rows_XR, axis=1)
        rows_XR[np.arange(len(rows_XR)), top_X] -= excess_X.clip(min=0)
    return rows_XR


def split_batch(units: ReplicaUnits, counts_BLE: np.ndarray, planned_weights_LS: np.ndarray | None = None,
                sweeps: int = 12, fallback: bool = True, moves: int = 4) -> np.ndarray:
    """[B, L, S] int64 rows each slot receives for each batch's counts (see the module docstring).

    `planned_weights_LS`: the planner's split (start of the water-fill, and the fallback); equal
    split when None. `fallback=False` skips step 4 (to measure the water-fill alone).
    """
    counts_BLE = np.asarray(counts_BLE, dtype=np.int64)
    if counts_BLE.ndim == 2:
        return split_batch(units, counts_BLE[None], planned_weights_LS, sweeps, fallback)[0]
    num_batches = counts_BLE.shape[0]
    L, W = units.num_layers, units.num_workers
    num_cells = L * W + 1  # + one cell that padding shards write to; never part of a worker's load
    fixed_rows_BX = counts_BLE[:, units.fixed_layer_X, units.fixed_expert_X]
    fixed_cell_X = units.fixed_layer_X * W + units.fixed_slot_X // units.slots_per_worker
    fixed_BC = _cell_sums(fixed_rows_BX * units.fixed_width_X, fixed_cell_X, num_cells)
    count_BQ = counts_BLE[:, units.layer_Q, units.expert_Q]
    total_BQ = count_BQ.astype(np.float64)
    weights_QR = units.replica_weights_QR(planned_weights_LS)
    max_replicas = weights_QR.shape[1]
    planned_rows_BQR = np.zeros((num_batches, units.num_groups, max_replicas), dtype=np.int64)
    for groups, count in units.blocks:  # the fallback: the planned weights' rule (placement.dispatch)
        weights_XR = np.broadcast_to(weights_QR[groups, :count], (num_batches, len(groups), count)).reshape(-1, count)
        block = rule_counts(count_BQ[:, groups].ravel(), weights_XR, np.full(num_batches * len(groups), count))
        planned_rows_BQR[:, groups, :count] = block.reshape(num_batches, len(groups), count)
    rows_BQR = planned_rows_BQR
    if units.num_groups and sweeps > 0:
        share_BQR = _water_fill_sweeps(units, fixed_BC, total_BQ, weights_QR, num_cells, sweeps)
        filled_BQR = integer_rows(share_BQR.reshape(-1, max_replicas), count_BQ.ravel(),
                                  np.broadcast_to(units.present_QR, share_BQR.shape).reshape(-1, max_replicas))
        rows_BQR = filled_BQR.reshape(share_BQR.shape)
        rows_BQR = _integer_moves(units, counts_BLE, rows_BQR, moves)
        if fallback:
            better_BL = busiest_compute(units, _slot_rows(units, counts_BLE, planned_rows_BQR)) < busiest_compute(
                units, _slot_rows(units, counts_BLE, rows_BQR))
            rows_BQR = np.where(better_BL[:, units.layer_Q][:, :, None], planned_rows_BQR, rows_BQR)
    return _slot_rows(units, counts_BLE, rows_BQR)


def _water_fill_sweeps(units, fixed_BC, total_BQ, weights_QR, num_cells, sweeps):
    """[B, Q, R] float shares of the replicated experts after damped Jacobi water-filling (best
    seen), computed block by block of equal replica count."""
    num_batches = fixed_BC.shape[0]
    L, W = units.num_layers, units.num_workers
    cell_QRJ = units.cell_QRJ()
    blocks = []  # per block: groups, cells [q, r, J], widths, shard mask, rates, totals [B, q]
    for groups, count in units.blocks:
        blocks.append((groups, cell_QRJ[groups, :count], units.width_QRJ[groups, :count],
                       units.slot_QRJ[groups, :count] >= 0, units.rate_QR[groups, :count], total_BQ[:, groups]))
    cells = np.concatenate([b[1].ravel() for b in blocks])
    shares = [total[:, :, None] * weights_QR[groups, : cell.shape[1]][None] for groups, cell, _, _, _, total in blocks]
    best = [share.copy() for share in shares]
    best_max_BL = np.full((num_batches, L), np.inf)
    for sweep in range(sweeps + 1):
        contribution = np.concatenate(
            [(share[..., None] * block[2]).reshape(num_batches, -1) for share, block in zip(shares, blocks)], axis=1)
        load_BC = fixed_BC + _cell_sums(contribution, cells, num_cells)
        max_BL = load_BC[:, : L * W].reshape(num_batches, L, W).max(axis=2)
        better_BL = max_BL < best_max_BL
        for i, (groups, *_rest) in enumerate(blocks):
            np.copyto(best[i], shares[i], where=better_BL[:, units.layer_Q[groups]][:, :, None])
        np.minimum(best_max_BL, max_BL, out=best_max_BL)
        if sweep == sweeps:
            break
        for i, (groups, cell, width, shard_mask, rate, total) in enumerate(blocks):
            base = load_BC[:, cell] - shares[i][..., None] * width  # the worker's load without this replica
            base = np.where(shard_mask[None], base, -np.inf).max(axis=3)  # a replica's level: its busiest shard
            count = cell.shape[1]
            fill = water_fill_rates(base.reshape(-1, count), np.broadcast_to(rate, base.shape).reshape(-1, count),
                                    total.ravel()).reshape(base.shape)
            shares[i] = shares[i] + _DAMPING * (fill - shares[i])
    out_BQR = np.zeros((num_batches, *units.present_QR.shape))
    for (groups, cell, *_rest), share in zip(blocks, best):
        out_BQR[:, groups, : cell.shape[1]] = share
    return out_BQR


def _integer_moves(units: ReplicaUnits, counts_BLE: np.ndarray, rows_BQR: np.ndarray, rounds: int) -> np.ndarray:
    """Step 4 of the module docstring: up to `rounds` moves per (batch, layer).

    A replica's load is that of its busiest shard's worker and its rate the widest shard's width
    (1 for a whole replica), so moving m rows from replica r to r' lowers r's workers by at most
    m * rate_r and raises none of r''s above load_r' + m * rate_r'. The best move off a replica on
    the busiest worker goes to the least loaded other replica, so each round looks at those only."""
    if rounds <= 0 or units.num_groups == 0:
        return rows_BQR
    rows_BQR = rows_BQR.copy()
    present_QR, rate_QR = units.present_QR, units.rate_QR
    worker_QRJ = np.where(units.slot_QRJ >= 0, units.slot_QRJ // units.slots_per_worker, 0)
    layer_QRJ = np.broadcast_to(units.layer_Q[:, None, None], worker_QRJ.shape)
    shard_QRJ = units.slot_QRJ >= 0
    load_BLW = worker_compute(units, _slot_rows(units, counts_BLE, rows_BQR))  # kept up to date below
    flat_load = load_BLW.reshape(-1)
    for _ in range(rounds):
        busiest_BL = load_BLW.max(axis=2)
        load_BQR = np.where(shard_QRJ[None], load_BLW[:, layer_QRJ, worker_QRJ], -np.inf).max(axis=3)
        on_busiest = present_QR[None] & (rows_BQR > 0) & (load_BQR >= busiest_BL[:, units.layer_Q][:, :, None] * (1 - 1e-12))
        batch_X, group_X, src_X = np.nonzero(on_busiest)
        if len(batch_X) == 0:
            break
        dst_level_XR = np.where(present_QR[group_X], load_BQR[batch_X, group_X] + rate_QR[group_X], np.inf)
        dst_level_XR[np.arange(len(src_X)), src_X] = np.inf
        dst_X = np.argmin(dst_level_XR, axis=1)  # least loaded after one row; ties: the lower replica index
        src_load_X, dst_load_X = load_BQR[batch_X, group_X, src_X], load_BQR[batch_X, group_X, dst_X]
        src_rate_X, dst_rate_X = rate_QR[group_X, src_X], rate_QR[group_X, dst_X]
        amount_X = np.minimum(rows_BQR[batch_X, group_X, src_X], np.floor((src_load_X - dst_load_X) / (src_rate_X + dst_rate_X) + 1e-9))
        score_X = np.maximum(src_load_X - amount_X * src_rate_X, dst_load_X + amount_X * dst_rate_X)
        useful = (amount_X >= 1) & (score_X < src_load_X * (1 - 1e-12))
        batch_X, group_X, src_X, dst_X, amount_X, score_X = (a[useful] for a in (batch_X, group_X, src_X, dst_X, amount_X, score_X))
        if len(batch_X) == 0:
            break
        # one move per (batch, layer): the lowest score, then the lowest group and replica
        row_X = batch_X * units.num_layers + units.layer_Q[group_X]
        order = np.lexsort((src_X, group_X, score_X, row_X))
        first = order[np.r_[True, row_X[order][1:] != row_X[order][:-1]]]
        batch, group, src, dst = batch_X[first], group_X[first], src_X[first], dst_X[first]
        amount = amount_X[first].astype(np.int64)
        rows_BQR[batch, group, src] -= amount
        rows_BQR[batch, group, dst] += amount
        for replica, sign in ((src, -1.0), (dst, 1.0)):  # every shard's worker moves by rows x width
            cell_XJ = (batch[:, None] * units.num_layers + layer_QRJ[group, replica]) * units.num_workers + worker_QRJ[group, replica]
            change_XJ = sign * amount[:, None] * units.width_QRJ[group, replica]
            np.add.at(flat_load, cell_XJ[shard_QRJ[group, replica]], change_XJ[shard_QRJ[group, replica]])
    return rows_BQR


def _slot_rows(units: ReplicaUnits, counts_BLE: np.ndarray, rows_BQR: np.ndarray) -> np.ndarray:
    """[B, L, S] int64 rows per slot: fixed experts' counts, replicated experts' split (every
    shard of a replica gets the replica's rows)."""
    num_batches = counts_BLE.shape[0]
    rows_BLS = np.zeros((num_batches, units.num_layers, units.num_slots + 1), dtype=np.int64)
    rows_BLS[:, units.fixed_layer_X, units.fixed_slot_X] = counts_BLE[:, units.fixed_layer_X, units.fixed_expert_X]
    slot_QRJ = np.where(units.slot_QRJ >= 0, units.slot_QRJ, units.num_slots)
    layer_QRJ = np.broadcast_to(units.layer_Q[:, None, None], slot_QRJ.shape)
    rows_BLS[:, layer_QRJ, slot_QRJ] = np.broadcast_to(rows_BQR[..., None], (num_batches, *slot_QRJ.shape))
    return rows_BLS[:, :, : units.num_slots]


def worker_compute(units: ReplicaUnits, rows_BLS: np.ndarray) -> np.ndarray:
    """[B, L, W] compute per worker (rows x width, in whole-expert rows)."""
    compute_BLS = rows_BLS * units.width_LS
    return compute_BLS.reshape(*compute_BLS.shape[:2], units.num_workers, units.slots_per_worker).sum(axis=3)


def busiest_compute(units: ReplicaUnits, rows_BLS: np.ndarray) -> np.ndarray:
    """[B, L] compute of the busiest worker."""
    return worker_compute(units, rows_BLS).max(axis=2)


def pairs_to_slots(topk_ids_TK: np.ndarray, phy2log_S: np.ndarray, replica_S: np.ndarray, rows_S: np.ndarray,
                   num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(pair_X, slot_X): every (token, k) pair of one layer, as pair index token * K + k, with each
    slot it is sent to (one per shard of its replica), by the rule in the module docstring."""
    ids_X = np.asarray(topk_ids_TK, dtype=np.int64).ravel()
    phy2log_S, replica_S, rows_S = np.asarray(phy2log_S), np.asarray(replica_S), np.asarray(rows_S, dtype=np.int64)
    rank_X, count_E = occurrence_rank(ids_X, num_experts)
    held = np.flatnonzero(phy2log_S >= 0)
    max_replicas = int(replica_S[held].max(initial=0)) + 1
    rows_ER = np.zeros((num_experts, max_replicas), dtype=np.int64)
    rows_ER[phy2log_S[held], replica_S[held]] = rows_S[held]  # every shard of a replica holds the same rows
    if not np.array_equal(rows_ER.sum(axis=1), count_E):
        bad = int(np.flatnonzero(rows_ER.sum(axis=1) != count_E)[0])
        raise ValueError(f"expert {bad}: split rows add up to {int(rows_ER[bad].sum())}, the batch routed {int(count_E[bad])}")
    cumulative_ER = np.cumsum(rows_ER, axis=1)
    replica_X = (cumulative_ER[ids_X] <= rank_X[:, None]).sum(axis=1)
    # fan out: slots of (expert, replica) in ascending order
    key_S = np.where(phy2log_S >= 0, phy2log_S * max_replicas + replica_S, -1)
    order = np.argsort(key_S, kind="stable")
    sorted_key = key_S[order]
    pair_key_X = ids_X * max_replicas + replica_X
    lo_X, hi_X = np.searchsorted(sorted_key, pair_key_X, "left"), np.searchsorted(sorted_key, pair_key_X, "right")
    fan_X = hi_X - lo_X
    pair_out = np.repeat(np.arange(len(ids_X)), fan_X)
    offset = np.arange(fan_X.sum()) - np.repeat(np.cumsum(fan_X) - fan_X, fan_X)
    return pair_out, order[np.repeat(lo_X, fan_X) + offset]

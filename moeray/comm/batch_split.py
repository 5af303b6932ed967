"""Per-batch split of one layer's replicated experts on device: the torch twin of placement.batch_split.

Legend (docs/architecture.md): E experts, R replicas, W workers, S slots, T tokens, K top-k,
X any number of rows; local (docs/placement.md): Q replicated experts of the layer, J shards of
one replica, M entries of one worker's fixed-order sum.

    units = DeviceReplicaUnits.from_units(ReplicaUnits.of(placement), layer, planned_weights_LS, device)
    count_E, rank_offset_E = global_rank_offsets(counts_WE, rank)   # counts_WE: all-gathered local counts
    rows_ER = split_rows(units, count_E)                            # the same on every worker
    replica_TK = replica_of_pairs(topk_ids_TK, rows_ER, rank_offset_E)

`split_rows` runs the steps of placement.batch_split.split_batch for one layer and one batch:
damped Jacobi water-filling (best sweep kept), integer rows, integer moves, the planned-weights
fallback. The per-step path has no device-to-host sync: a fixed number of sweeps and rounds
(rounds of the reference that `break` early are no-ops here), dense fixed shapes, no `.item()`,
`nonzero`, `bincount` or boolean-mask indexing, and every float reduction a dense sum in a fixed
order (no atomics): the same counts give the same rows on every worker. Checked on CUDA with
`torch.cuda.set_sync_debug_mode("error")` and a CUDA-graph capture of `split_rows` (the test
skips without CUDA) and by running on device "meta". Shares and loads are float64 (exact
integers up to 2**53; the tensors are [Q, R] and [W], small).

Bit-for-bit parity on CPU float64: every float sum adds in the reference's order. A worker's load
in the sweeps is a sequential sum (numpy's `bincount`: single-replica shards in slot order, then
replicated shards in the order of the reference's blocks); a worker's compute in the moves and the
fallback follows numpy's pairwise `sum` (`_numpy_order_sum`). The 2-replica water-fill uses the
reference's closed form, the others its sorted-prefix formula. So the rows equal the reference's
exactly (tests/unit/test_device_batch_split.py); on CUDA they are deterministic but may differ from
the CPU in the last bits of a float, hence in a tie.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moeray.comm.slot_map import count_per_index, occurrence_rank

_DAMPING = 0.5  # = placement.batch_split._DAMPING
_ABSENT = 1e300  # level of a padding replica: never filled


@dataclass(frozen=True)
class DeviceReplicaUnits:
    """One layer's slots, sorted into what moves per batch and what does not, as dense padded
    tensors on one device (built on the host once per placement).

    Replicated experts (Q of them, ascending expert id, padded to R replicas of J shards):
    expert_Q, present_QR, num_replicas_Q, rate_QR (widest shard's width; 1 on padding),
    weights_QR / cum_weights_QR (planned split, 0 padded), worker_QRJ (0 on padding),
    width_QRJ (0 on padding), shard_QRJ; replica_QW / width_QW: the replica of q on worker w
    (-1: none) and its width (a worker holds at most one slot of an expert).
    Sum tables (padding entries point at an appended zero):
    fixed_expert_WM / fixed_width_WM: single-replica slots of each worker in slot order (padding
    expert E); shard_order_WM: flat q*R*J + r*J + j of each worker's replicated shards in the
    reference's bincount order (padding Q*R*J); slot_source_S: each slot's rows in
    cat(count_E, rows_QR.flatten(), [0]); width_S; group_of_E: q of each expert (Q: not replicated).
    """

    num_workers: int
    slots_per_worker: int
    expert_Q: torch.Tensor
    present_QR: torch.Tensor
    num_replicas_Q: torch.Tensor
    rate_QR: torch.Tensor
    weights_QR: torch.Tensor
    cum_weights_QR: torch.Tensor
    worker_QRJ: torch.Tensor
    width_QRJ: torch.Tensor
    shard_QRJ: torch.Tensor
    replica_QW: torch.Tensor
    width_QW: torch.Tensor
    fixed_expert_WM: torch.Tensor
    fixed_width_WM: torch.Tensor
    shard_order_WM: torch.Tensor
    slot_source_S: torch.Tensor
    width_S: torch.Tensor
    group_of_E: torch.Tensor

    @classmethod
    def from_units(cls, units, layer: int, planned_weights_LS=None, device="cpu") -> DeviceReplicaUnits:
        """Layer `layer` of a placement.batch_split.ReplicaUnits; `planned_weights_LS` as in split_batch."""
        spw, W, E = units.slots_per_worker, units.num_workers, units.num_experts
        groups = np.flatnonzero(units.layer_Q == layer)  # ascending = the reference's group order
        Q, (R, J) = len(groups), units.slot_QRJ.shape[1:]
        slot_QRJ, width_QRJ = units.slot_QRJ[groups], units.width_QRJ[groups]
        present_QR, shard_QRJ = units.present_QR[groups], slot_QRJ >= 0
        num_replicas_Q = present_QR.sum(axis=1)
        weights_QR = units.replica_weights_QR(planned_weights_LS)[groups]
        worker_QRJ = np.where(shard_QRJ, slot_QRJ // spw, 0)
        q_X, r_X, j_X = np.nonzero(shard_QRJ)
        worker_X = worker_QRJ[q_X, r_X, j_X]
        replica_QW, width_QW = np.full((Q, W), -1, dtype=np.int64), np.zeros((Q, W))
        replica_QW[q_X, worker_X], width_QW[q_X, worker_X] = r_X, width_QRJ[q_X, r_X, j_X]
        # the reference adds replicated shards block by block (ascending replica count), then q, r, j
        order = np.lexsort((j_X, r_X, q_X, num_replicas_Q[q_X]))
        shard_order_WM = _per_worker_table((q_X * R * J + r_X * J + j_X)[order], worker_X[order], W, Q * R * J)
        fixed = (units.fixed_layer_X == layer)
        fixed_slot_X, fixed_expert_X = units.fixed_slot_X[fixed], units.fixed_expert_X[fixed]  # ascending slot
        fixed_expert_WM = _per_worker_table(fixed_expert_X, fixed_slot_X // spw, W, E)
        fixed_width_WM = _per_worker_table(units.fixed_width_X[fixed], fixed_slot_X // spw, W, 0.0)
        group_of_E = np.full(E, Q, dtype=np.int64)
        group_of_E[units.expert_Q[groups]] = np.arange(Q)
        phy2log_S = units.phy2log_LS[layer]
        slot_source_S = np.full(len(phy2log_S), E + Q * R, dtype=np.int64)
        held = phy2log_S >= 0
        group_S = group_of_E[np.maximum(phy2log_S, 0)]
        moves_S = held & (group_S < Q)
        slot_source_S[held & ~moves_S] = phy2log_S[held & ~moves_S]
        slot_source_S[moves_S] = E + group_S[moves_S] * R + units.replica_LS[layer][moves_S]

        def put(array, dtype=torch.float64):
            return torch.as_tensor(np.array(array), dtype=dtype, device=device)  # a writable copy

        long, flag = torch.int64, torch.bool
        return cls(W, spw, put(units.expert_Q[groups], long), put(present_QR, flag), put(num_replicas_Q, long),
                   put(units.rate_QR[groups]), put(weights_QR), put(np.cumsum(weights_QR, axis=1)),
                   put(worker_QRJ, long), put(width_QRJ), put(shard_QRJ, flag), put(replica_QW, long), put(width_QW),
                   put(fixed_expert_WM, long), put(fixed_width_WM), put(shard_order_WM, long),
                   put(slot_source_S, long), put(units.width_LS[layer]), put(group_of_E, long))

    @property
    def num_groups(self) -> int:
        return int(self.present_QR.shape[0])


def _per_worker_table(values_X, worker_X, num_workers, pad):
    """[W, M] values_X listed per worker in their given order, padded with `pad` (host only)."""
    counts = np.bincount(worker_X, minlength=num_workers)
    table = np.full((num_workers, int(counts.max(initial=0))), pad, dtype=np.asarray(values_X).dtype)
    order = np.argsort(worker_X, kind="stable")
    column = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    table[worker_X[order], column] = np.asarray(values_X)[order]
    return table


def _sequential_sum(x_XM: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim left to right (numpy bincount's order); cumsum is sequential on CPU
    and a fixed-order scan on CUDA."""
    return x_XM.cumsum(-1)[..., -1] if x_XM.shape[-1] else x_XM.sum(-1)


def _numpy_order_sum(x_XM: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in the order of numpy's pairwise `sum` (8 strided accumulators up to
    128 entries, halves above), so float64 sums match the reference bit for bit. Static shapes."""
    n = x_XM.shape[-1]
    if n < 8:
        return _sequential_sum(x_XM)
    if n > 128:
        half = n // 2 - (n // 2) % 8
        return _numpy_order_sum(x_XM[..., :half]) + _numpy_order_sum(x_XM[..., half:])
    full = n - n % 8
    r = x_XM[..., :full].unflatten(-1, (full // 8, 8))
    r = _sequential_sum(r.transpose(-1, -2))  # accumulator i: entries i, i + 8, ... in order
    total = ((r[..., 0] + r[..., 1]) + (r[..., 2] + r[..., 3])) + ((r[..., 4] + r[..., 5]) + (r[..., 6] + r[..., 7]))
    for i in range(full, n):
        total = total + x_XM[..., i]
    return total


def global_rank_offsets(counts_WE: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count_E, rank_offset_E) from every worker's local per-expert counts (all-gathered, in rank
    order): the batch's global counts, and the pairs routed to each expert by lower ranks."""
    return counts_WE.sum(dim=0), counts_WE[:rank].sum(dim=0)


def split_rows(units: DeviceReplicaUnits, count_E: torch.Tensor, sweeps: int = 12, moves: int = 4,
               fallback: bool = True) -> torch.Tensor:
    """int64 [E, R] rows per (expert, replica) for this batch's global counts count_E (int64 [E]).

    Single-replica experts: all rows on replica 0. Every row sums to count_E exactly; absent
    replicas get 0. `sweeps`, `moves`, `fallback` as in placement.batch_split.split_batch.
    """
    count_E = count_E.to(torch.int64)
    count_Q = count_E[units.expert_Q]
    planned_QR = _planned_rows(units, count_Q)
    rows_QR = planned_QR
    if units.num_groups and sweeps > 0:  # static: the reference keeps the planned rows otherwise
        share_QR = _water_fill_sweeps(units, count_E, count_Q, sweeps)
        rows_QR = _integer_moves(units, count_E, integer_rows(share_QR, count_Q, units.present_QR), moves)
        if fallback:  # never worse than the planned weights
            planned_busiest = _worker_compute(units, count_E, planned_QR).amax()
            planned_wins = planned_busiest < _worker_compute(units, count_E, rows_QR).amax()
            rows_QR = torch.where(planned_wins, planned_QR, rows_QR)
    # per expert: its group's rows, or (not replicated) everything on replica 0
    padded_QR = torch.cat([rows_QR, rows_QR.new_zeros(1, rows_QR.shape[1])])
    first_R = torch.arange(rows_QR.shape[1], device=count_E.device) == 0
    replicated_E1 = (units.group_of_E < units.num_groups)[:, None]
    return torch.where(replicated_E1, padded_QR[units.group_of_E], count_E[:, None] * first_R)


def replica_of_pairs(topk_ids_TK: torch.Tensor, rows_ER: torch.Tensor,
                     rank_offset_E: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [T, K]: the replica each local (token, k) pair goes to (the rule of
    placement.batch_split.pairs_to_slots): global occurrence rank j = rank_offset_E[e] + the local
    rank in row-major (token, k) order; replica r with cum_{r-1} <= j < cum_r, cum = cumsum of rows_ER[e]."""
    ids_X = topk_ids_TK.reshape(-1).to(torch.int64)
    rank_X = occurrence_rank(ids_X, count_per_index(ids_X, rows_ER.shape[0]))  # scatter_add on int64: no sync
    if rank_offset_E is not None:
        rank_X = rank_X + rank_offset_E[ids_X]
    replica_X = (torch.cumsum(rows_ER, dim=1)[ids_X] <= rank_X[:, None]).sum(dim=1)
    return replica_X.view(topk_ids_TK.shape)


def integer_rows(share_QR: torch.Tensor, total_Q: torch.Tensor, present_QR: torch.Tensor) -> torch.Tensor:
    """int64 [Q, R]: floor of each share, the remainder to the largest fractional parts (ties to
    the lower replica; placement.batch_split.integer_rows); rows add up to total_Q exactly."""
    share_QR = torch.where(present_QR, share_QR.clamp(min=0.0), 0.0)
    floor_QR = share_QR.floor()
    left_Q = total_Q - floor_QR.to(torch.int64).sum(dim=1)
    fraction_QR = torch.where(present_QR, share_QR - floor_QR, -torch.inf)
    order_QR = torch.sort(-fraction_QR, dim=1, stable=True).indices
    replica_QR = torch.arange(share_QR.shape[1], device=share_QR.device).expand_as(order_QR)
    rank_QR = torch.empty_like(order_QR).scatter_(1, order_QR, replica_QR)
    rows_QR = floor_QR.to(torch.int64) + (rank_QR < left_Q[:, None]).to(torch.int64)
    # floors above the total (shares summing past it by rounding): take the excess off the largest row
    excess_Q = (rows_QR.sum(dim=1) - total_Q).clamp(min=0)
    return rows_QR - excess_Q[:, None] * (replica_QR == rows_QR.argmax(dim=1, keepdim=True))


def _planned_rows(units, count_Q):
    """int64 [Q, R] rows of the planned weights' rule (placement.dispatch.rule_counts, bit for bit)."""
    count_Q1 = count_Q[:, None]
    c_Q1 = count_Q1.clamp(min=1).to(torch.float64)
    cum_QR = units.cum_weights_QR[:, :-1]
    guess_QR = torch.minimum((c_Q1 * cum_QR - 0.5).ceil().clamp(min=0.0), count_Q1.to(torch.float64)).to(torch.int64)
    for _ in range(2):  # move the guess onto the rule's exact boundary
        # int64 + 0.5 would promote to the default float32: convert to float64 first
        lower_QR = (guess_QR > 0) & (((guess_QR - 1).to(torch.float64) + 0.5) / c_Q1 >= cum_QR)
        guess_QR = guess_QR - lower_QR.to(torch.int64)
        higher_QR = (guess_QR < count_Q1) & ((guess_QR.to(torch.float64) + 0.5) / c_Q1 < cum_QR)
        guess_QR = guess_QR + higher_QR.to(torch.int64)
    boundary_R = torch.arange(cum_QR.shape[1], device=count_Q.device)
    bounds_QR = torch.where(boundary_R >= (units.num_replicas_Q.clamp(min=1) - 1)[:, None], count_Q1, guess_QR)
    bounds_QR = torch.cat([torch.zeros_like(count_Q1), bounds_QR, count_Q1], dim=1)
    return torch.diff(torch.cummax(bounds_QR, dim=1).values, dim=1)


def _worker_compute(units, count_E, rows_QR):
    """float64 [W] rows x width per worker, summed over its slots in numpy's order (worker_compute)."""
    source_X = torch.cat([count_E, rows_QR.reshape(-1), count_E.new_zeros(1)])
    compute_S = source_X[units.slot_source_S] * units.width_S
    return _numpy_order_sum(compute_S.view(units.num_workers, units.slots_per_worker))


def _water_fill_sweeps(units, count_E, count_Q, sweeps):
    """float64 [Q, R] shares after `sweeps` damped Jacobi sweeps: those of the sweep whose busiest
    worker was lowest (the first such sweep)."""
    total_Q = count_Q.to(torch.float64)
    count_pad_E = torch.cat([count_E, count_E.new_zeros(1)])
    fixed_W = _sequential_sum(count_pad_E[units.fixed_expert_WM] * units.fixed_width_WM)
    share_QR = total_Q[:, None] * units.weights_QR
    best_QR, best_busiest = share_QR, torch.full((), torch.inf, dtype=torch.float64, device=share_QR.device)
    zero = share_QR.new_zeros(1)
    for sweep in range(sweeps + 1):
        contribution_X = torch.cat([(share_QR[..., None] * units.width_QRJ).reshape(-1), zero])
        load_W = fixed_W + _sequential_sum(contribution_X[units.shard_order_WM])
        busiest = load_W.amax()
        best_QR = torch.where(busiest < best_busiest, share_QR, best_QR)
        best_busiest = torch.minimum(best_busiest, busiest)
        if sweep == sweeps:
            break
        # a replica's level: its busiest shard's worker without this replica's own rows
        others_QRJ = load_W[units.worker_QRJ] - share_QR[..., None] * units.width_QRJ
        base_QR = torch.where(units.shard_QRJ, others_QRJ, -torch.inf).amax(dim=2)
        base_QR = torch.where(units.present_QR, base_QR, _ABSENT)
        fill_QR = _water_fill(base_QR, units.rate_QR, total_Q, units.num_replicas_Q)
        share_QR = share_QR + _DAMPING * (fill_QR - share_QR)
    return best_QR


def _water_fill(base_QR, rate_QR, total_Q, num_replicas_Q):
    """[Q, R] shares >= 0 summing to total_Q that level base + share * rate
    (placement.batch_split.water_fill_rates: its closed form for 2 replicas, its sorted prefix else)."""
    speed_QR = 1.0 / rate_QR
    b0, b1, s0, s1 = base_QR[:, 0], base_QR[:, 1], speed_QR[:, 0], speed_QR[:, 1]
    low = b0 <= b1
    b_lo, b_hi = torch.where(low, b0, b1), torch.where(low, b1, b0)
    s_lo, s_hi = torch.where(low, s0, s1), torch.where(low, s1, s0)
    level_Q = torch.minimum(b_lo + total_Q / s_lo, (total_Q + b_lo * s_lo + b_hi * s_hi) / (s_lo + s_hi))
    pair_QR = torch.nn.functional.pad((level_Q[:, None] - base_QR[:, :2]).clamp(min=0.0) * speed_QR[:, :2],
                                      (0, base_QR.shape[1] - 2))
    if base_QR.shape[1] == 2:  # static: every group has 2 replicas
        return pair_QR
    order_QR = torch.sort(base_QR, dim=1, stable=True).indices  # padding (_ABSENT) sorts last
    sorted_speed_QR = 1.0 / rate_QR.gather(1, order_QR)
    filled_QR = total_Q[:, None] + torch.cumsum(base_QR.gather(1, order_QR) * sorted_speed_QR, dim=1)
    prefix_QR = filled_QR / torch.cumsum(sorted_speed_QR, dim=1)  # level if the first k are filled
    many_QR = (prefix_QR.amin(dim=1, keepdim=True) - base_QR).clamp(min=0.0) / rate_QR
    return torch.where((num_replicas_Q == 2)[:, None], pair_QR, many_QR)


def _integer_moves(units, count_E, rows_QR, rounds):
    """Up to `rounds` moves (placement.batch_split._integer_moves): each round moves rows of one
    replicated expert from a replica on the busiest worker to its least loaded other replica, the
    move leaving the lowest pair maximum (ties: lowest group, then replica). A round without a
    useful move changes nothing (amount 0), so the fixed count equals the reference's early break."""
    Q, R = rows_QR.shape
    device = rows_QR.device
    present_QR, rate_QR = units.present_QR, units.rate_QR
    flat_QR = torch.arange(Q * R, device=device).view(Q, R)
    not_self_RR = ~torch.eye(R, dtype=torch.bool, device=device)
    load_W = _worker_compute(units, count_E, rows_QR)  # kept up to date below
    for _ in range(rounds):
        load_QR = torch.where(units.shard_QRJ, load_W[units.worker_QRJ], -torch.inf).amax(dim=2)
        on_busiest_QR = present_QR & (rows_QR > 0) & (load_QR >= load_W.amax() * (1 - 1e-12))
        # destination of a move off (q, r): the least loaded other replica after one row (first on ties)
        level_QR = torch.where(present_QR, load_QR + rate_QR, torch.inf)
        dst_QR = torch.where(not_self_RR, level_QR[:, None, :], torch.inf).argmin(dim=2)
        dst_load_QR, dst_rate_QR = load_QR.gather(1, dst_QR), rate_QR.gather(1, dst_QR)
        gap_QR = torch.where(on_busiest_QR, load_QR - dst_load_QR, 0.0)  # 0 off the candidates: no inf - inf
        amount_QR = torch.minimum(rows_QR.to(torch.float64), (gap_QR / (rate_QR + dst_rate_QR) + 1e-9).floor())
        score_QR = torch.maximum(load_QR - amount_QR * rate_QR, dst_load_QR + amount_QR * dst_rate_QR)
        useful_QR = on_busiest_QR & (amount_QR >= 1) & (score_QR < load_QR * (1 - 1e-12))
        key_QR = torch.where(useful_QR, score_QR, torch.inf)
        chosen_QR = useful_QR & (key_QR == key_QR.amin())
        pick = torch.where(chosen_QR, flat_QR, Q * R).amin().clamp(max=Q * R - 1).view(1)  # shape [1]: no sync
        amount = torch.where(useful_QR.any(), amount_QR.view(-1).gather(0, pick), 0.0)  # 0: no useful move
        group, src, dst = pick // R, pick % R, dst_QR.view(-1).gather(0, pick)
        move_QR = (flat_QR == group * R + dst).to(torch.int64) - (flat_QR == pick).to(torch.int64)
        rows_QR = rows_QR + amount.to(torch.int64) * move_QR
        # every shard's worker moves by rows x width; one replica of `group` per worker at most
        replica_W, width_W = units.replica_QW.index_select(0, group)[0], units.width_QW.index_select(0, group)[0]
        change_W = amount * width_W
        load_W = load_W + torch.where(replica_W == src, -change_W, torch.where(replica_W == dst, change_W, 0.0))
    return rows_QR

"""Map routed (token, k) pairs to slots on device: the torch twin of `placement.dispatch`.

Legend: T tokens, K top-k, E experts, R max replicas, J max shards of one replica, S slots,
X = T*K pairs.

Rule (deterministic, vectorised, no host sync): for a pair routed to expert e, let j be its rank
among this batch's pairs routed to e (row-major (token, k) order) and c_e their count. With the
cumulative replica weights W_e (replicas in ascending slot order, last entry 1), the pair goes to
replica r = #{i < R-1 : W_e[i] <= (j + 0.5) / c_e}. Equal weights give contiguous equal chunks.

Sharded experts (placement.shards): a replica may be J_r > 1 slots, each holding a column range of
the expert's FFN width; a pair sent to that replica goes to every one of its shards, and the
weighted combine sums their partial outputs. With shards in the layer (J > 1) every pair fans out
to J entries, [T, K*J] in row-major (token, k, shard) order; a replica with fewer than J shards
pads its entries with `num_slots`, the padding slot id that dispatchers never send and combine as
zero (its routing weight is 0). Without shards J = 1 and the map is [T, K] as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from placement.shards import rank_in_runs


@dataclass(frozen=True)
class DeviceSlotMap:
    """One layer's placement, on the device that routes: the slots of each replica's shards
    replica_slots_ERJ (ascending slots; padded entries `num_slots`), cumulative replica weights
    cumw_ER (padded replicas 1.0), and the group's slot count."""

    replica_slots_ERJ: torch.Tensor
    cumw_ER: torch.Tensor
    num_slots: int

    @classmethod
    def from_numpy(
        cls, log2phy_ER: np.ndarray, num_slots: int, replica_weights_ER: np.ndarray | None = None, device="cpu"
    ) -> DeviceSlotMap:
        """Whole experts: replica r of expert e is the one slot log2phy_ER[e, r] (-1 padded)."""
        log2phy_ER = np.asarray(log2phy_ER, dtype=np.int64)
        return cls._build(np.where(log2phy_ER >= 0, log2phy_ER, num_slots)[:, :, None], num_slots, replica_weights_ER, device)

    @classmethod
    def from_placement(cls, placement, layer: int, device="cpu") -> DeviceSlotMap:
        """Layer `layer` of a placement.Placement: its replicas (shards grouped by
        `replica_of_slot`), and its split weights (`weights_LS`: planned, or equal)."""
        phy2log_S = placement.phy2log[layer]
        replica_S = placement.replica_of_slot[layer]
        weights_S = placement.weights_LS[layer]
        num_experts, num_slots = placement.num_experts, placement.num_slots
        num_replicas = max(1, int(placement.num_replicas[layer].max(initial=0)))
        held_X = np.flatnonzero(phy2log_S >= 0)  # ascending slots, so shards come in column order
        unit_X = phy2log_S[held_X] * num_replicas + replica_S[held_X]
        order = np.argsort(unit_X, kind="stable")
        held_X, unit_X = held_X[order], unit_X[order]
        shard_X = rank_in_runs(unit_X)
        first_X = shard_X == 0
        max_shards = int(shard_X.max(initial=0)) + 1
        slots_ERJ = np.full((num_experts, num_replicas, max_shards), num_slots, dtype=np.int64)
        slots_ERJ.reshape(-1, max_shards)[unit_X, shard_X] = held_X
        weights_ER = np.zeros((num_experts, num_replicas))
        weights_ER.reshape(-1)[unit_X[first_X]] = weights_S[held_X[first_X]]
        return cls._build(slots_ERJ, num_slots, weights_ER if placement.replica_weights is not None else None, device)

    @classmethod
    def _build(cls, slots_ERJ: np.ndarray, num_slots: int, replica_weights_ER, device) -> DeviceSlotMap:
        valid_ER = slots_ERJ[:, :, 0] < num_slots
        if not valid_ER[:, 0].all():
            raise ValueError(f"expert {int(np.flatnonzero(~valid_ER[:, 0])[0])} has no slot")
        if replica_weights_ER is None:
            weights_ER = valid_ER / valid_ER.sum(axis=1, keepdims=True)
        else:
            weights_ER = np.where(valid_ER, np.asarray(replica_weights_ER, dtype=np.float64), 0.0)
            weights_ER = weights_ER / weights_ER.sum(axis=1, keepdims=True)
        cumw_ER = np.cumsum(weights_ER, axis=1)
        cumw_ER[~valid_ER] = 1.0
        cumw_ER[np.arange(len(cumw_ER)), valid_ER.sum(axis=1) - 1] = 1.0  # exact 1 despite rounding
        return cls(
            torch.as_tensor(np.array(slots_ERJ, dtype=np.int64), device=device),
            torch.as_tensor(cumw_ER, dtype=torch.float64, device=device),
            int(num_slots),
        )

    @property
    def max_replicas(self) -> int:
        return int(self.replica_slots_ERJ.shape[1])

    @property
    def max_shards(self) -> int:
        """J: entries each routed pair fans out to (1 without shards)."""
        return int(self.replica_slots_ERJ.shape[2])


def count_per_index(ids_X: torch.Tensor, length: int, weight_X: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [length]: how often each value 0..length-1 occurs in ids_X (every id must be < length),
    each occurrence counted `weight_X` times when given (0 for padding rows).

    The same as `torch.bincount(ids_X, minlength=length)` without its device-to-host sync: on
    CUDA bincount reads max(ids) to size its output, which stalls the host once per call.
    """
    weight_X = torch.ones_like(ids_X, dtype=torch.int64) if weight_X is None else weight_X
    return torch.zeros(length, dtype=torch.int64, device=ids_X.device).scatter_add_(0, ids_X, weight_X)


def pairs_to_slots(topk_ids_TK: torch.Tensor, slot_map: DeviceSlotMap,
                   count_E: torch.Tensor | None = None, replica_TK: torch.Tensor | None = None) -> torch.Tensor:
    """slot_ids [T, K*J]: the slots each (token, k) pair is sent to (J = slot_map.max_shards; padded
    entries `num_slots`). `count_E` (pairs per expert in this batch) may be passed in by a caller
    that has it already; `replica_TK` (the per-batch split's choice) replaces the weights' rule."""
    ids_X = topk_ids_TK.reshape(-1)
    num_tokens, top_k = topk_ids_TK.shape
    if replica_TK is not None:
        replica_X = replica_TK.reshape(-1)
    elif slot_map.max_replicas == 1 or ids_X.numel() == 0:
        replica_X = torch.zeros_like(ids_X)
    else:
        replica_X = _replica_by_weights(ids_X, slot_map, count_E)
    return slot_map.replica_slots_ERJ[ids_X, replica_X].view(num_tokens, top_k * slot_map.max_shards)


def occurrence_rank(ids_X: torch.Tensor, count_E: torch.Tensor) -> torch.Tensor:
    """[X] rank of each pair among this batch's pairs of its expert, in row-major (token, k) order:
    a stable sort by expert, minus the expert's first position (count_E: pairs per expert)."""
    order_X = torch.sort(ids_X, stable=True).indices
    start_E = torch.cumsum(count_E, 0) - count_E
    position_X = torch.arange(ids_X.numel(), device=ids_X.device)
    return torch.empty_like(ids_X).scatter_(0, order_X, position_X - start_E[ids_X[order_X]])


def _replica_by_weights(ids_X: torch.Tensor, slot_map: DeviceSlotMap, count_E: torch.Tensor | None) -> torch.Tensor:
    if count_E is None:
        count_E = count_per_index(ids_X, slot_map.replica_slots_ERJ.shape[0])
    rank_X = occurrence_rank(ids_X, count_E)
    frac_X = (rank_X.double() + 0.5) / count_E[ids_X].double()
    cumw_XR = slot_map.cumw_ER[ids_X]
    return (cumw_XR[:, :-1] <= frac_X.unsqueeze(1)).sum(dim=1)


def fan_out_weights(topk_weights_TK: torch.Tensor, slot_ids_TX: torch.Tensor, slot_map: DeviceSlotMap) -> torch.Tensor:
    """[T, K*J] routing weights of the fanned-out entries: each shard of a replica gets the pair's
    weight (the partial outputs add up to the expert's output), padding entries 0."""
    if slot_map.max_shards == 1:
        return topk_weights_TK
    weights_TX = topk_weights_TK.repeat_interleave(slot_map.max_shards, dim=1)
    return torch.where(slot_ids_TX < slot_map.num_slots, weights_TX, torch.zeros_like(weights_TX))

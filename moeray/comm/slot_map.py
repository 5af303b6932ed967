"""Map routed (token, k) pairs to slots on device: the torch twin of `placement.dispatch`.

Legend: T tokens, K top-k, E experts, R max replicas, N = T*K pairs.

Rule (deterministic, vectorised, no host sync): for a pair routed to expert e, let j be its rank
among this batch's pairs routed to e (row-major (token, k) order) and c_e their count. With the
cumulative replica weights W_e (replicas in ascending slot order, last entry 1), the pair goes to
replica r = #{i < R-1 : W_e[i] <= (j + 0.5) / c_e}. Equal weights give contiguous equal chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DeviceSlotMap:
    """One layer's placement, on the device that routes: log2phy_ER (-1 padded), cumulative replica
    weights cumw_ER (padded entries 1.0), and the group's slot count."""

    log2phy_ER: torch.Tensor
    cumw_ER: torch.Tensor
    num_slots: int

    @classmethod
    def from_numpy(
        cls, log2phy_ER: np.ndarray, num_slots: int, replica_weights_ER: np.ndarray | None = None, device="cpu"
    ) -> DeviceSlotMap:
        log2phy_ER = np.array(log2phy_ER, dtype=np.int64)  # a writable copy for torch
        valid_ER = log2phy_ER >= 0
        if replica_weights_ER is None:
            weights_ER = valid_ER / valid_ER.sum(axis=1, keepdims=True)
        else:
            weights_ER = np.where(valid_ER, np.asarray(replica_weights_ER, dtype=np.float64), 0.0)
            weights_ER = weights_ER / weights_ER.sum(axis=1, keepdims=True)
        cumw_ER = np.cumsum(weights_ER, axis=1)
        cumw_ER[~valid_ER] = 1.0
        cumw_ER[np.arange(len(cumw_ER)), valid_ER.sum(axis=1) - 1] = 1.0  # exact 1 despite rounding
        return cls(
            torch.as_tensor(log2phy_ER, device=device),
            torch.as_tensor(cumw_ER, dtype=torch.float64, device=device),
            int(num_slots),
        )

    @property
    def max_replicas(self) -> int:
        return int(self.log2phy_ER.shape[1])


def count_per_index(ids_N: torch.Tensor, length: int, weight_N: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [length]: how often each value 0..length-1 occurs in ids_N (every id must be < length),
    each occurrence counted `weight_N` times when given (0 for padding rows).

    The same as `torch.bincount(ids_N, minlength=length)` without its device-to-host sync: on
    CUDA bincount reads max(ids) to size its output, which stalls the host once per call.
    """
    weight_N = torch.ones_like(ids_N, dtype=torch.int64) if weight_N is None else weight_N
    return torch.zeros(length, dtype=torch.int64, device=ids_N.device).scatter_add_(0, ids_N, weight_N)


def pairs_to_slots(topk_ids_TK: torch.Tensor, slot_map: DeviceSlotMap,
                   count_E: torch.Tensor | None = None) -> torch.Tensor:
    """slot_ids_TK: the slot each (token, k) pair is sent to. `count_E` (pairs per expert in this
    batch) may be passed in by a caller that has it already."""
    ids_N = topk_ids_TK.reshape(-1)
    if slot_map.max_replicas == 1 or ids_N.numel() == 0:
        return slot_map.log2phy_ER[ids_N, 0].view_as(topk_ids_TK)
    num_experts = slot_map.log2phy_ER.shape[0]
    # Occurrence rank of each pair within its expert: stable sort by expert, subtract group start.
    order_N = torch.sort(ids_N, stable=True).indices
    if count_E is None:
        count_E = count_per_index(ids_N, num_experts)
    start_E = torch.cumsum(count_E, 0) - count_E
    rank_N = torch.empty_like(ids_N)
    rank_N[order_N] = torch.arange(ids_N.numel(), device=ids_N.device) - start_E[ids_N[order_N]]
    frac_N = (rank_N.double() + 0.5) / count_E[ids_N].double()
    cumw_NR = slot_map.cumw_ER[ids_N]
    replica_N = (cumw_NR[:, :-1] <= frac_N.unsqueeze(1)).sum(dim=1)
    return slot_map.log2phy_ER[ids_N, replica_N].view_as(topk_ids_TK)

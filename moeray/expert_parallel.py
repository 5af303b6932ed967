"""Expert parallelism applied after model construction: each MoE layer's `experts` module is
replaced by `SlotExperts`, which holds only this worker's slots and talks through a Dispatcher.

Legend: T local tokens, K top-k, D hidden, F expert FFN width, H = 2F, E experts,
S_w local slots, R max replicas, J max shards of a replica, W workers.

Sharded slots (placement.shards): a slot holding columns [c0, c1) of its expert's F keeps them
first: gate rows [0, w) and up rows [F, F + w) of w13, down columns [0, w) of w2, zeros after
(w = c1 - c0, `width_S`). Every pair routed to a sharded replica fans out to its shards; the
kernel does only each slot's w columns and the weighted combine adds the partial outputs.

Host tier (`host`, moeray.host_tier): local slots [0, B) are the parameters below, on the device;
slots [B, S_w) live in host memory and are computed there or fetched on demand. Whole experts only.

Per-batch split (`batch_split`): from the batch's global per-expert counts (one fixed-size
exchange of [E] counts after routing, no host sync) every worker computes the same rows per
replica (moeray.comm.batch_split) and sends each pair to its replica by its global rank.
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.comm.batch_split import DeviceReplicaUnits, global_rank_offsets, replica_of_pairs, split_rows
from moeray.comm.dispatcher import Dispatcher
from moeray.comm.slot_map import DeviceSlotMap, count_per_index, fan_out_weights, pairs_to_slots
from moeray.host_tier import HostSlots
from moeray.kernels import expert_mlp
from moeray.kernels.combine import IMPLS as COMBINE_IMPLS
from moeray.kernels.combine import unpermute_weighted


class SlotExperts(nn.Module):
    """This worker's expert slots for one layer.

    Invariant: `w13_SHD[s]` / `w2_SDF[s]` hold the weights of the logical expert that the current
    placement puts in local slot s (zeros for a free slot, which no token is ever routed to).
    `load_E` accumulates routed pairs per logical expert and `rows_S` the rows each local slot
    computed, both on the device: no host sync per step (they are read every N steps).
    `width_S` (int32 [S_w] or None: all whole) is the FFN columns each local slot holds;
    `batch_split` (DeviceReplicaUnits of this layer or None: the planned weights) turns on the
    per-batch replica split. Both are set with the slot map, from one placement.
    `host` (HostSlots or None): local slots from host.first_slot on live in host memory; the
    parameters then hold only the device slots [0, host.first_slot).
    """

    def __init__(self, w13_SHD: torch.Tensor, w2_SDF: torch.Tensor, slot_map: DeviceSlotMap,
                 dispatcher: Dispatcher, num_experts: int, kernel_impl: str = "auto", combine_impl: str = "auto",
                 overlap_chunks: int = 1, width_S: torch.Tensor | None = None,
                 batch_split: DeviceReplicaUnits | None = None, host: HostSlots | None = None):
        super().__init__()
        if host is not None and (host.first_slot != w13_SHD.shape[0] or width_S is not None or overlap_chunks > 1):
            raise ValueError(f"host slots start at {host.first_slot} after {w13_SHD.shape[0]} device slots, hold whole "
                             f"experts and run without overlap chunks")
        self.host = host
        self.w13_SHD = nn.Parameter(w13_SHD, requires_grad=False)
        self.w2_SDF = nn.Parameter(w2_SDF, requires_grad=False)
        self.slot_map = slot_map
        self.width_S = width_S
        self.batch_split = batch_split
        self.dispatcher = dispatcher
        if combine_impl not in COMBINE_IMPLS:
            raise ValueError(f"combine_impl must be one of {COMBINE_IMPLS}, got {combine_impl!r}")
        if overlap_chunks < 1:
            raise ValueError(f"overlap_chunks must be >= 1, got {overlap_chunks}")
        self.kernel_impl = kernel_impl
        self.combine_impl = combine_impl
        # > 1: the layer step is pipelined over token chunks (see _forward_overlapped).
        self.overlap_chunks = overlap_chunks
        self.timer = None  # a moeray.bench.phases.PhaseTimer while a benchmark profiles phases
        self.record_load = True
        # int64 [T] or None: 1 for real rows, 0 for padding rows of a captured CUDA-graph step
        # (moeray/generation/cuda_graphs.py); padding is computed but never counted as load.
        self.row_weight_T: torch.Tensor | None = None
        self.register_buffer("load_E", torch.zeros(num_experts, dtype=torch.int64, device=w13_SHD.device))
        self.register_buffer("rows_S", torch.zeros(self.num_slots, dtype=torch.int64, device=w13_SHD.device))

    @property
    def num_slots(self) -> int:
        """S_w: device slots, then host slots."""
        return self.w13_SHD.shape[0] + (0 if self.host is None else self.host.num_slots)

    def slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13_HD, w2_DF) of local slot `slot`, where it lives (a view: only read it)."""
        device_slots = self.w13_SHD.shape[0]
        if slot < device_slots:
            return self.w13_SHD.data[slot], self.w2_SDF.data[slot]
        return self.host.w13_XHD[slot - device_slots], self.host.w2_XDF[slot - device_slots]

    def write_slot(self, slot: int, w13_HD: torch.Tensor, w2_DF: torch.Tensor) -> None:
        """Copy one expert's weights into local slot `slot` (a commit, under the step lock)."""
        device_slots = self.w13_SHD.shape[0]
        if slot >= device_slots:
            self.host.write(slot - device_slots, w13_HD, w2_DF)
            return
        dst13, dst2 = self.slot_weights(slot)
        dst13.copy_(w13_HD)
        dst2.copy_(w2_DF)

    def all_slot_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13_SHD, w2_SDF) of every local slot on the host (checks, resizes)."""
        if self.host is None:
            return self.w13_SHD.detach().cpu(), self.w2_SDF.detach().cpu()
        return (torch.cat([self.w13_SHD.detach().cpu(), self.host.w13_XHD]),
                torch.cat([self.w2_SDF.detach().cpu(), self.host.w2_XDF]))

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        timer = self.timer
        count_E = None
        pair_weight_X = None
        if self.row_weight_T is not None:
            pair_weight_X = self.row_weight_T.repeat_interleave(topk_ids_TK.shape[1], output_size=topk_ids_TK.numel())
        if self.record_load:
            count_E = count_per_index(topk_ids_TK.reshape(-1), self.load_E.numel(), pair_weight_X)
            self.load_E += count_E
        # the replica split ranks every pair, padding included, so it needs the unweighted counts
        unweighted_E = None if pair_weight_X is not None else count_E
        replica_TK = None if self.batch_split is None else self._split_batch(topk_ids_TK, unweighted_E)
        slot_ids_TX = pairs_to_slots(topk_ids_TK, self.slot_map, unweighted_E, replica_TK)  # X = K * J
        weights_TX = fan_out_weights(topk_weights_TK, slot_ids_TX, self.slot_map)
        if pair_weight_X is not None and self.record_load:  # one worker: local slots, no shards (J = 1)
            self.rows_S += count_per_index(slot_ids_TX.reshape(-1), self.rows_S.numel(), pair_weight_X)
        if timer is not None:
            timer.mark("route")
        if self.overlap_chunks > 1 and hasattr(self.dispatcher, "dispatch_start"):  # else nothing to overlap
            return self._forward_overlapped(x_TD, slot_ids_TX, weights_TX)
        dispatched = self.dispatcher.dispatch(x_TD, slot_ids_TX)
        y_MD = self._compute(dispatched)
        if timer is not None:
            timer.mark("experts")
        out_TD = self.dispatcher.combine_weighted(y_MD, dispatched, weights_TX, self.combine_impl)
        if timer is not None:
            timer.mark("combine")
        return out_TD

    def _split_batch(self, topk_ids_TK: torch.Tensor, count_E: torch.Tensor | None) -> torch.Tensor:
        """replica_TK of the per-batch split: every worker's counts (one fixed-size exchange), the
        same rows per replica on every worker, each pair's replica by its global rank."""
        if count_E is None:
            count_E = count_per_index(topk_ids_TK.reshape(-1), self.load_E.numel())
        counts_WE = self.dispatcher.gather_counts(count_E)
        global_E, rank_offset_E = global_rank_offsets(counts_WE, self.dispatcher.rank)
        return replica_of_pairs(topk_ids_TK, split_rows(self.batch_split, global_E), rank_offset_E)

    def _compute(self, dispatched) -> torch.Tensor:
        """y_MD: this worker's slots applied to the rows it received (and the rows counted)."""
        if self.record_load and self.row_weight_T is None:
            self.rows_S += dispatched.slot_offsets_S1.diff()
        if self.host is not None:
            return self.host.compute(dispatched.tokens_MD, dispatched.order_M, dispatched.slot_offsets_S1,
                                     self.w13_SHD, self.w2_SDF, self.kernel_impl)
        return expert_mlp(dispatched.tokens_MD, self.w13_SHD, self.w2_SDF, dispatched.slot_offsets_S1,
                          dispatched.order_M, impl=self.kernel_impl, width_S=self.width_S)

    def _forward_overlapped(self, x_TD: torch.Tensor, slot_ids_TK: torch.Tensor,
                            topk_weights_TK: torch.Tensor) -> torch.Tensor:
        """The same result as the plain path, with the exchanges hidden behind the expert math.

        Every chunk's rows exchange is launched up front; chunk c's kernel waits only for chunk
        c's rows, so it runs while later chunks are in flight, and its results go back while
        chunk c+1 computes. Collectives of one group complete in launch order, so every rank
        launches in the same order: all dispatches, then one send-back per chunk. On a GPU the
        waits are stream-ordered: the host enqueues the whole step without blocking after the
        dispatch's one counts sync.
        """
        pending = self.dispatcher.dispatch_start(x_TD, slot_ids_TK, self.overlap_chunks)
        returning = []
        for chunk in pending:
            dispatched = chunk.wait()
            returning.append((self.dispatcher.send_back_start(self._compute(dispatched), dispatched), dispatched))
        outs = []
        for rows, dispatched in returning:
            first = dispatched.first_token
            weights_TK = topk_weights_TK[first:first + dispatched.num_tokens]
            outs.append(unpermute_weighted(rows.wait(), dispatched.send_order_X, weights_TK, self.combine_impl))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

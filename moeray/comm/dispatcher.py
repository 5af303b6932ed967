"""The Dispatcher seam: move routed tokens to the slots that hold their experts, and back.

    dispatch(x_TD, slot_ids_TK) -> Dispatched (rows to compute here, grouped by local slot)
    combine(y_MD, dispatched)   -> y_TKD (each (token, k) pair's expert output, in the caller's order)
    combine_weighted(y_MD, dispatched, weights_TK) -> out_TD (the routing-weighted sum over k;
                                  the serving path: one fused pass, see moeray.kernels.combine)

Expert math runs on plain local tensors between the two calls. `LocalDispatcher` moves nothing
(one worker owns every slot); `AllToAllDispatcher` exchanges over a collective group. Both must give
the same y_TKD for the same slot_ids_TK; tests hold them to that.

Legend: T local tokens, K top-k, D hidden, N = T*K pairs, W workers, S_w slots per worker,
S = W * S_w slots in the group, M rows received by this worker.
Slots of worker w are [w * S_w, (w + 1) * S_w), so sorting pairs by slot also sorts them by worker.

Slot id S is padding (a sharded layer fans each pair out to J entries, moeray.comm.slot_map): it
sorts after every real slot, is never sent or computed, and comes back from combine as a zero row
(its routing weight is 0). Only AllToAllDispatcher meets it: one worker holds no shards (no worker
holds two slots of one expert: Placement.validate), so LocalDispatcher's slot ids are all < S,
and a padding id there fails its count (an index out of range) instead of computing garbage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moeray.comm.slot_map import count_per_index
from moeray.kernels.combine import unpermute, unpermute_weighted


@dataclass(frozen=True)
class Dispatched:
    """What a worker computes: rows `tokens_MD[order_M[o[s]:o[s+1]]]` belong to local slot s
    (o = slot_offsets_S1), exactly the layout `moeray.kernels.expert_mlp` takes."""

    tokens_MD: torch.Tensor
    order_M: torch.Tensor
    slot_offsets_S1: torch.Tensor
    # What combine needs to undo the exchange.
    send_order_X: torch.Tensor
    num_tokens: int
    top_k: int
    send_splits: tuple[int, ...] = ()
    recv_splits: tuple[int, ...] = ()
    first_token: int = 0  # where this chunk's tokens start in the caller's batch


class Dispatcher(Protocol):
    slots_per_worker: int
    rank: int

    def gather_counts(self, count_E: torch.Tensor) -> torch.Tensor: ...

    def dispatch(self, x_TD: torch.Tensor, slot_ids_TK: torch.Tensor) -> Dispatched: ...

    def combine(self, y_MD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor: ...

    def combine_weighted(self, y_MD: torch.Tensor, dispatched: Dispatched, weights_TK: torch.Tensor,
                         impl: str = "auto") -> torch.Tensor: ...


def _sort_pairs_by_slot(slot_ids_TK: torch.Tensor) -> torch.Tensor:
    """send_order_X: pair indices (token * K + k) in ascending slot order, stable."""
    return torch.sort(slot_ids_TK.reshape(-1), stable=True).indices


def _offsets(count_S: torch.Tensor) -> torch.Tensor:
    return torch.cat([count_S.new_zeros(1), torch.cumsum(count_S, 0)])


def _unsort(rows_XD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
    return unpermute(rows_XD, dispatched.send_order_X, dispatched.num_tokens, dispatched.top_k)


class LocalDispatcher:
    """One worker holds every slot: group pairs by slot, no communication."""

    def __init__(self, num_slots: int):
        self.slots_per_worker = num_slots
        self.rank = 0

    def gather_counts(self, count_E: torch.Tensor) -> torch.Tensor:
        """counts_WE of every worker (here: this one)."""
        return count_E[None]

    def dispatch(self, x_TD: torch.Tensor, slot_ids_TK: torch.Tensor) -> Dispatched:
        num_tokens, top_k = slot_ids_TK.shape
        send_order_X = _sort_pairs_by_slot(slot_ids_TK)
        tokens_MD = x_TD.index_select(0, send_order_X // top_k)  # already grouped by slot
        count_S = count_per_index(slot_ids_TK.reshape(-1), self.slots_per_worker)
        order_M = torch.arange(tokens_MD.shape[0], device=x_TD.device)
        return Dispatched(tokens_MD, order_M, _offsets(count_S), send_order_X, num_tokens, top_k)

    def combine(self, y_MD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        return _unsort(y_MD, dispatched)  # y_MD is already in send order: nothing moved

    def combine_weighted(self, y_MD: torch.Tensor, dispatched: Dispatched, weights_TK: torch.Tensor,
                         impl: str = "auto") -> torch.Tensor:
        return unpermute_weighted(y_MD, dispatched.send_order_X, weights_TK, impl)


class AllToAllDispatcher:
    """Expert parallelism over a collective group with an uneven-split all_to_all.

    Two exchanges per dispatch: the per-slot counts (fixed size), then the rows. The row split
    sizes must be host ints, so there is exactly one device-to-host sync per dispatch (the counts).
    An idle worker (T = 0) still takes part in both exchanges so the group stays in lockstep.
    """

    def __init__(self, group, slots_per_worker: int):
        self.group = group
        self.world_size = group.world_size
        self.slots_per_worker = slots_per_worker
        self.timer = None  # a moeray.bench.phases.PhaseTimer while a benchmark profiles phases
        self.rank = group.rank

    def _mark(self, phase: str) -> None:
        if self.timer is not None:
            self.timer.mark(phase)

    def gather_counts(self, count_E: torch.Tensor) -> torch.Tensor:
        """counts_WE: every worker's [E] counts in rank order, by one fixed-size all_to_all (each
        rank sends its counts to all): no split sizes, so no host sync, and stream-ordered on NCCL."""
        counts_WE = count_E.new_empty((self.world_size, count_E.numel()))
        self.group.all_to_all(counts_WE, count_E[None].expand(self.world_size, -1).contiguous())
        return counts_WE

    def dispatch(self, x_TD: torch.Tensor, slot_ids_TK: torch.Tensor) -> Dispatched:
        return self.dispatch_start(x_TD, slot_ids_TK, num_chunks=1)[0].wait()

    def dispatch_start(self, x_TD: torch.Tensor, slot_ids_TK: torch.Tensor, num_chunks: int) -> list[PendingDispatch]:
        """Split the tokens into `num_chunks` contiguous chunks and launch each chunk's rows
        exchange without waiting: chunk c's expert math can run while chunks c+1.. are in flight.

        One counts exchange serves every chunk, so there is still one host sync per dispatch.
        Every rank must pass the same `num_chunks` (the exchanges pair up by launch order).
        """
        num_tokens, top_k = slot_ids_TK.shape
        W, S_w = self.world_size, self.slots_per_worker
        bounds = chunk_bounds(num_tokens, num_chunks)
        send_orders, sends, counts = [], [], []
        for first, end in bounds:
            ids_TK = slot_ids_TK[first:end]
            send_order_X = _sort_pairs_by_slot(ids_TK)
            send_orders.append(send_order_X)
            sends.append(x_TD[first:end].index_select(0, send_order_X // top_k))
            counts.append(count_per_index(ids_TK.reshape(-1), W * S_w + 1)[:-1].view(W, S_w))  # padding dropped
        self._mark("sort+gather")

        send_count_WCS = torch.stack(counts, dim=1)  # peer first: the exchange splits dim 0 by rank
        recv_count_WCS = torch.empty_like(send_count_WCS)
        self.group.all_to_all(recv_count_WCS, send_count_WCS)
        # host sync (the only one): row split sizes of every chunk's uneven all_to_all, sent and
        # received, in one device-to-host copy.
        send_splits_CW, recv_splits_CW = torch.stack([send_count_WCS.sum(2).t(), recv_count_WCS.sum(2).t()]).tolist()
        self._mark("counts exchange+sync")

        # Rows arrive grouped by (source worker, local slot); the kernel wants them by local slot.
        # Computed before the rows exchange so that on a GPU it overlaps it.
        local_slot_WS = torch.arange(S_w, device=x_TD.device).repeat(W)
        arranged = []
        for c in range(len(bounds)):
            recv_count_WS = recv_count_WCS[:, c]
            # output_size from the host copy above: without it repeat_interleave syncs to size its output
            local_slot_M = torch.repeat_interleave(local_slot_WS, recv_count_WS.reshape(-1),
                                                   output_size=sum(recv_splits_CW[c]))
            arranged.append((torch.sort(local_slot_M, stable=True).indices, _offsets(recv_count_WS.sum(0))))
        self._mark("arrange")

        pending = []
        for c, (first, end) in enumerate(bounds):
            tokens_MD = x_TD.new_empty((sum(recv_splits_CW[c]), x_TD.shape[1]))
            # padding entries sort last: the real rows are a prefix of the gathered ones
            op = self.group.all_to_all_start(tokens_MD, sends[c][: sum(send_splits_CW[c])], recv_splits_CW[c],
                                             send_splits_CW[c])
            order_M, slot_offsets_S1 = arranged[c]
            dispatched = Dispatched(tokens_MD, order_M, slot_offsets_S1, send_orders[c], end - first, top_k,
                                    tuple(send_splits_CW[c]), tuple(recv_splits_CW[c]), first)
            pending.append(PendingDispatch(op, dispatched, self))
        return pending

    def send_back_start(self, y_MD: torch.Tensor, dispatched: Dispatched) -> PendingRows:
        """Launch the exchange that returns computed rows to the workers that sent them."""
        num_entries, num_sent = dispatched.num_tokens * dispatched.top_k, sum(dispatched.send_splits)
        if num_sent == num_entries:
            back_XD = y_MD.new_empty((num_entries, y_MD.shape[1]))
        else:  # padding entries (never sent) combine as zero rows after the real ones
            back_XD = y_MD.new_zeros((num_entries, y_MD.shape[1]))
        op = self.group.all_to_all_start(back_XD[:num_sent], y_MD, list(dispatched.send_splits), list(dispatched.recv_splits))
        return PendingRows(op, back_XD, self)

    def combine(self, y_MD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        return _unsort(self.send_back_start(y_MD, dispatched).wait(), dispatched)

    def combine_weighted(self, y_MD: torch.Tensor, dispatched: Dispatched, weights_TK: torch.Tensor,
                         impl: str = "auto") -> torch.Tensor:
        back_XD = self.send_back_start(y_MD, dispatched).wait()
        return unpermute_weighted(back_XD, dispatched.send_order_X, weights_TK, impl)


@dataclass
class PendingDispatch:
    """One chunk's rows in flight; `wait()` gives its Dispatched (stream-ordered on NCCL)."""

    op: object
    dispatched: Dispatched
    dispatcher: AllToAllDispatcher

    def wait(self) -> Dispatched:
        self.op.wait()
        self.dispatcher._mark("rows exchange")
        return self.dispatched


@dataclass
class PendingRows:
    """Computed rows on their way back; `wait()` gives them in send (slot-sorted) order."""

    op: object
    back_XD: torch.Tensor
    dispatcher: AllToAllDispatcher

    def wait(self) -> torch.Tensor:
        self.op.wait()
        self.dispatcher._mark("exchange back")
        return self.back_XD


def chunk_bounds(num_tokens: int, num_chunks: int) -> list[tuple[int, int]]:
    """`num_chunks` contiguous (first, end) token ranges of near-equal size (some may be empty)."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    edges = [num_tokens * c // num_chunks for c in range(num_chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))

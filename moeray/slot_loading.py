"""A worker's slots for a placement: read from the checkpoint, rebuilt from pieces at a migration,
and the per-layer routing state (slot map, widths, per-batch split) that goes with them.

Legend: L layers, S_w a worker's slots, D hidden, F expert FFN width, H = 2F, X copies.

Whole experts keep the simple paths (a slot is one expert, copied whole). With shards in either
the live or the next placement (placement.shards), a slot of the next version is assembled at
stage time, off the step path: the columns it keeps from its live slot (same expert) plus the
column pieces of other slots that the migration lists (placement.migration: columns as fractions
of F, turned into columns by the rounding of Placement.shard_columns). A whole exported source
slot travels and the destination takes its piece out (at most one slot's bytes per copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moeray.comm import p2p
from moeray.comm.batch_split import DeviceReplicaUnits
from moeray.comm.slot_map import DeviceSlotMap
from moeray.shard_slots import assemble_slot, columns_of_worker, pack_columns, width_of_worker
from placement import Placement
from placement.batch_split import ReplicaUnits


@dataclass(frozen=True)
class LayerRouting:
    """What a SlotExperts needs of one placement besides its weights."""

    slot_map: DeviceSlotMap
    width_S: torch.Tensor | None
    batch_split: DeviceReplicaUnits | None


def layer_routings(placement: Placement, rank: int, ffn: int, per_batch_split: bool, device) -> list[LayerRouting]:
    """Every layer's routing state of `placement` on this worker (built on the host once per version)."""
    units = ReplicaUnits.of(placement) if per_batch_split else None
    return [LayerRouting(DeviceSlotMap.from_placement(placement, layer, device=device),
                         width_of_worker(placement, layer, rank, ffn, device),
                         None if units is None else DeviceReplicaUnits.from_units(units, layer, placement.replica_weights, device))
            for layer in range(placement.num_layers)]


def read_slots(reader, placement: Placement, layer: int, rank: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13_SHD, w2_SDF) of the worker's slots in one layer from the checkpoint, shards packed."""
    experts_S = placement.slots_of_worker(rank)[layer]
    w13_SHD, w2_SDF = reader.read_expert_slots(layer, experts_S, dtype)
    if not placement.is_sharded:
        return w13_SHD, w2_SDF
    return pack_columns(w13_SHD, w2_SDF, columns_of_worker(placement, layer, rank, w2_SDF.shape[2]))


def sharded(*placements: Placement) -> bool:
    return any(p.is_sharded for p in placements)


def piece_columns(col_start: float, col_stop: float, ffn: int) -> tuple[int, int]:
    """A migration's column fractions as columns: the rounding of placement.shards.shard_columns."""
    return int(np.rint(col_start * ffn)), int(np.rint(col_stop * ffn))


def assemble_next_slots(old: Placement, new: Placement, rank: int, live, pieces: dict, dtype, device) -> dict:
    """{(layer, local slot): (w13_HD, w2_DF)} of every slot of this worker whose expert or columns
    change from `old` to `new`, assembled from its kept columns and `pieces`
    ({(layer, local slot): [(w13_HD, w2_DF, source global slot, col_start, col_stop)]}).

    live(layer) -> (w13_SHD, w2_SDF) of the worker's live slots (only read). Raises ValueError
    when a piece is for a slot that does not change or a slot's columns are not covered once."""
    spw = new.slots_per_worker
    out: dict = {}
    for layer in range(new.num_layers):
        w13_SHD, w2_SDF = live(layer)
        ffn = w2_SDF.shape[2]
        old_cols, new_cols = columns_of_worker(old, layer, rank, ffn), columns_of_worker(new, layer, rank, ffn)
        old_columns_S = old.shard_columns(ffn)[layer]
        old_e, new_e = old.slots_of_worker(rank)[layer], new.slots_of_worker(rank)[layer]
        for slot in range(spw):
            same_expert = old_e[slot] == new_e[slot]
            if new_e[slot] < 0 or (same_expert and tuple(old_cols[slot]) == tuple(new_cols[slot])):
                continue
            kept = (w13_SHD[slot], w2_SDF[slot], tuple(old_cols[slot])) if same_expert else None
            sources = [(w13, w2, tuple(old_columns_S[src]), piece_columns(c0, c1, ffn))
                       for w13, w2, src, c0, c1 in pieces.get((layer, slot), [])]
            out[(layer, slot)] = assemble_slot(tuple(new_cols[slot]), tuple(w13_SHD.shape[1:]), tuple(w2_SDF.shape[1:]),
                                               dtype, device, kept, sources)
    stray = sorted(set(pieces) - set(out))
    if stray:
        raise ValueError(f"migration pieces for slots {stray} that keep their expert and columns")
    return out


def receipts(copies: list[tuple]) -> tuple[list[p2p.SlotCopy], list[tuple]]:
    """GPU migration of a sharded placement: copies (layer, src rank, src slot, dst rank, dst slot,
    col_start, col_stop) -> the whole source slots to move (one per (layer, src rank, src slot,
    dst rank); SlotCopy.dst_slot is the receipt number that keys what arrives) and, per copy, its
    receipt number."""
    order: dict[tuple, int] = {}
    numbered = []
    for layer, src, src_slot, dst, _dst_slot, *_ in copies:
        key = (layer, src, src_slot, dst)
        numbered.append(order.setdefault(key, len(order)))
    moves = [p2p.SlotCopy(layer, src, src_slot, dst, number) for (layer, src, src_slot, dst), number in order.items()]
    return moves, numbered

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

import dataclasses
from dataclasses import dataclass

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

    def to(self, device) -> LayerRouting:
        """The same routing with every tensor on `device` (no copy where it is there already)."""
        return LayerRouting(_tensors_to(self.slot_map, device), None if self.width_S is None else self.width_S.to(device),
                            None if self.batch_split is None else _tensors_to(self.batch_split, device))


def _tensors_to(obj, device):
    """A frozen dataclass with its tensor fields moved to `device`."""
    moved = {f.name: getattr(obj, f.name).to(device) for f in dataclasses.fields(obj)
             if isinstance(getattr(obj, f.name), torch.Tensor)}
    return dataclasses.replace(obj, **moved)


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


def _missing(new_columns: tuple[int, int], kept: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Column ranges of new_columns = [s0, s1) not in kept (at most two)."""
    s0, s1 = new_columns
    if kept is None or kept[1] <= s0 or kept[0] >= s1:
        return [(s0, s1)] if s0 < s1 else []
    return [(lo, hi) for lo, hi in ((s0, kept[0]), (kept[1], s1)) if lo < hi]


def cover_columns(ranges: list[tuple[int, int]], sources: list[tuple]) -> list[tuple]:
    """Pieces [(w13_HD, w2_DF, source columns, piece columns)] covering every range left to right
    from sources [(w13_HD, w2_DF, source columns)], the one reaching furthest first.

    Decided here in integer columns (the rounding of Placement.shard_columns), not from the
    migration's fractions: a boundary that two fractions put within float noise of each other
    rounds to one column on both sides, so the pieces always tile the slot. ValueError naming the
    first column no shipped source holds."""
    pieces = []
    for lo, hi in ranges:
        at = lo
        while at < hi:
            holding = [src for src in sources if src[2][0] <= at < src[2][1]]
            if not holding:
                raise ValueError(f"column {at} of [{lo}, {hi}) is in none of the shipped source slots "
                                 f"{sorted(src[2] for src in sources)}")
            w13, w2, have = max(holding, key=lambda src: src[2][1])
            end = min(hi, have[1])
            pieces.append((w13, w2, have, (at, end)))
            at = end
    return pieces


def assemble_next_slots(old: Placement, new: Placement, rank: int, live, shipped: dict, dtype, device) -> dict:
    """{(layer, local slot): (w13_HD, w2_DF)} of every slot of this worker whose expert or columns
    change from `old` to `new`: the columns it keeps from its live slot (same expert), the rest cut
    from the whole source slots the migration shipped for it (`shipped`: {(layer, local slot):
    [(w13_HD, w2_DF, source global slot)]}; `cover_columns` picks the columns).

    live(layer) -> (w13_SHD, w2_SDF) of the worker's live slots (only read)."""
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
            sources = [(w13, w2, tuple(old_columns_S[src])) for w13, w2, src in shipped.get((layer, slot), [])]
            pieces = cover_columns(_missing(tuple(new_cols[slot]), None if kept is None else kept[2]), sources)
            out[(layer, slot)] = assemble_slot(tuple(new_cols[slot]), tuple(w13_SHD.shape[1:]), tuple(w2_SDF.shape[1:]),
                                               dtype, device, kept, pieces)
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

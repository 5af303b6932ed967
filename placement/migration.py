"""Migrations: the slot copies that turn placement v into v + 1.

Legend: L layers, E experts, S slots (S_w per worker), W workers, R replicas,
X copies of a migration (any number of rows).

A destination slot needs a copy when the new placement puts an expert there that the old one did
not hold, or (sharded experts, placement.shards) columns of it that the old slot did not hold. A
copy moves columns [col_start, col_stop) (fractions of the expert's FFN width F; the whole expert
when the arrays are None) of `expert` from old slot `src_slot` to new slot `dst_slot`. Sources
prefer the same worker (a local copy), then the same node, then the lowest slot id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # layout re-exports this module: import it lazily to keep either import order working
    from placement.layout import Placement, Topology

_EPS = 1e-9  # column fractions closer than this are the same boundary


@dataclass(frozen=True)
class Migration:
    """Slot copies that turn one placement into the next. Entry i: in layer `layer[i]`, slot
    `dst_slot[i]` receives expert `expert[i]` (columns [col_start[i], col_stop[i]) of F; the whole
    expert when those are None), copied from slot `src_slot[i]` of the old placement (a slot that
    held those columns). layer, dst_slot, expert, src_slot are [X] int64; col_* [X] float64.
    """

    layer: np.ndarray
    dst_slot: np.ndarray
    expert: np.ndarray
    src_slot: np.ndarray
    col_start: np.ndarray | None = None
    col_stop: np.ndarray | None = None

    @property
    def num_copies(self) -> int:
        return len(self.dst_slot)

    @property
    def copied_fraction(self) -> np.ndarray:
        """[X] fraction of one expert's bytes each copy moves (1.0 for whole-expert copies)."""
        if self.col_start is None:
            return np.ones(self.num_copies)
        return np.asarray(self.col_stop) - np.asarray(self.col_start)

    def column_copies(self) -> list[tuple[int, int, int, float, float]]:
        """[(layer, dst slot, src slot, col_start, col_stop)] of every copy, as plain Python values
        (fractions of F; (0.0, 1.0) for whole-expert copies): what the coordinator sends to workers."""
        starts = np.zeros(self.num_copies) if self.col_start is None else np.asarray(self.col_start, dtype=np.float64)
        stops = np.ones(self.num_copies) if self.col_stop is None else np.asarray(self.col_stop, dtype=np.float64)
        return list(zip(self.layer.tolist(), self.dst_slot.tolist(), self.src_slot.tolist(), starts.tolist(), stops.tolist()))

    def bytes_moved(self, bytes_per_expert: int) -> int:
        if self.col_start is None:
            return self.num_copies * int(bytes_per_expert)
        return round(float(self.copied_fraction.sum()) * int(bytes_per_expert))


def migration_between(old: Placement, new: Placement, topology: Topology | None = None) -> Migration:
    """Slot copies needed to go from `old` to `new` (see the module docstring)."""
    from placement.layout import Topology

    if old.phy2log.shape != new.phy2log.shape:
        raise ValueError(f"placements differ in shape: {old.phy2log.shape} vs {new.phy2log.shape}")
    topology = topology or Topology.flat(old.num_workers, old.slots_per_worker)
    if old.is_sharded or new.is_sharded:
        return _sharded_migration(old, new, topology)
    return _whole_migration(old, new, topology)


def _source_cost(topology: Topology, src_slot, dst_slot, slots_per_worker: int):
    """0 same worker, 1 same node, 2 other node (int or array)."""
    src_worker, dst_worker = np.floor_divide(src_slot, slots_per_worker), np.floor_divide(dst_slot, slots_per_worker)
    return (src_worker != dst_worker).astype(np.int64) + (topology.node_of_worker(src_worker) != topology.node_of_worker(dst_worker))


def _whole_migration(old: Placement, new: Placement, topology: Topology) -> Migration:
    """Whole experts only, vectorised over copies: one copy per slot whose expert changed."""
    spw = old.slots_per_worker
    changed = (new.phy2log != old.phy2log) & (new.phy2log >= 0)
    layers, dst = np.nonzero(changed)
    experts = new.phy2log[layers, dst]
    candidates_XR = old.log2phy[layers, np.maximum(experts, 0)]  # [X, R] old slots of each copied expert
    if len(dst) and (candidates_XR[:, 0] < 0).any():
        i = int(np.nonzero(candidates_XR[:, 0] < 0)[0][0])
        raise ValueError(f"layer {layers[i]}: expert {experts[i]} has no slot in the old placement to copy from")
    cost_XR = _source_cost(topology, np.maximum(candidates_XR, 0), dst[:, None], spw)
    cost_XR[candidates_XR < 0] = 3  # padding: never chosen (the first entry always exists)
    src = np.take_along_axis(candidates_XR, np.argmin(cost_XR, axis=1)[:, None], axis=1)[:, 0]
    return Migration(layers.astype(np.int64), dst.astype(np.int64), experts.astype(np.int64), src.astype(np.int64))


def _missing_ranges(start: float, stop: float, kept_start: float, kept_stop: float) -> list[tuple[float, float]]:
    """[start, stop) minus [kept_start, kept_stop): at most two ranges."""
    if kept_stop <= kept_start + _EPS or kept_stop <= start + _EPS or kept_start >= stop - _EPS:
        return [(start, stop)]
    pieces = []
    if kept_start > start + _EPS:
        pieces.append((start, kept_start))
    if kept_stop < stop - _EPS:
        pieces.append((kept_stop, stop))
    return pieces


def _sharded_migration(old: Placement, new: Placement, topology: Topology) -> Migration:
    """Column-range copies (a loop over the slots that change; sharded placements change few).

    A slot keeps the columns it already holds of the same expert (a shard cut out of a whole slot
    moves nothing); every missing range is covered left to right by old slots of the expert that
    hold its next column, the cheapest source first and, among equally cheap ones, the one
    reaching furthest (so a range comes in as few pieces as the old shards allow).
    """
    spw = old.slots_per_worker
    old_range = np.stack([old._replicas[1], old._replicas[2]], axis=-1)  # [L, S, 2]
    new_range = np.stack([new._replicas[1], new._replicas[2]], axis=-1)
    rows = {"layer": [], "dst_slot": [], "expert": [], "src_slot": [], "col_start": [], "col_stop": []}
    same_expert = new.phy2log == old.phy2log
    unchanged = same_expert & (np.abs(new_range - old_range) <= _EPS).all(axis=-1)
    for layer, dst in zip(*np.nonzero((new.phy2log >= 0) & ~unchanged)):
        expert = int(new.phy2log[layer, dst])
        start, stop = new_range[layer, dst]
        kept = old_range[layer, dst] if same_expert[layer, dst] else (0.0, 0.0)
        sources = old.log2phy[layer, expert]
        sources = sources[sources >= 0]
        if len(sources) == 0:
            raise ValueError(f"layer {layer}: expert {expert} has no slot in the old placement to copy from")
        cost = _source_cost(topology, sources, dst, spw)
        for lo, hi in _missing_ranges(start, stop, *kept):
            at = lo
            while at < hi - _EPS:
                holds = (old_range[layer, sources, 0] <= at + _EPS) & (old_range[layer, sources, 1] > at + _EPS)
                if not holds.any():
                    raise ValueError(f"layer {layer}: no old slot holds column {at:.6f} of expert {expert}")
                reach = old_range[layer, sources, 1]
                best = np.lexsort((sources, -reach, cost))  # cheapest, then furthest, then lowest slot
                src = int(next(sources[i] for i in best if holds[i]))
                end = min(hi, float(old_range[layer, src, 1]))
                for key, value in (("layer", layer), ("dst_slot", dst), ("expert", expert), ("src_slot", src),
                                   ("col_start", at), ("col_stop", end)):
                    rows[key].append(value)
                at = end
    ints = {k: np.asarray(rows[k], dtype=np.int64) for k in ("layer", "dst_slot", "expert", "src_slot")}
    return Migration(**ints, col_start=np.asarray(rows["col_start"], dtype=np.float64),
                     col_stop=np.asarray(rows["col_stop"], dtype=np.float64))

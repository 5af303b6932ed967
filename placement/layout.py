"""Placement and topology: which slot holds which logical expert.

Shapes (per the words in docs/architecture.md):
    L  MoE layers          E  logical experts per layer
    S  slots in the group  (= num_workers * slots_per_worker; slot s lives on worker s // slots_per_worker)
    R  max replicas of any expert in a layer
    N  number of slot copies in a migration

A placement is `phy2log [L, S]` (slot -> logical expert, -1 for a free slot). `log2phy [L, E, R]`
(-1 padded, replicas in ascending slot order) and `logcnt [L, E]` are derived from it, so they can
never disagree with it.

Pure numpy: this package never imports ray, torch.distributed, triton or cuda.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

FREE_SLOT = -1


def take_rows(values_LX: np.ndarray, index_LY: np.ndarray) -> np.ndarray:
    """[L, Y] values_LX[l, index_LY[l, y]]: `np.take_along_axis(values, index, axis=1)` for 2-D
    arrays as one flat take (~2.5x faster at [58, 288]; the planner does dozens per plan)."""
    values_LX = np.ascontiguousarray(values_LX)
    num_layers, width = values_LX.shape
    return values_LX.reshape(-1).take(index_LY + (np.arange(num_layers) * width)[:, None])


def expert_counts(phy2log_LS: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] int64 number of slots holding each expert (free slots, -1, are not counted)."""
    num_layers = phy2log_LS.shape[0]
    flat_LS = np.where(phy2log_LS >= 0, phy2log_LS + (np.arange(num_layers) * (num_experts + 1))[:, None], num_experts)
    return np.bincount(flat_LS.ravel(), minlength=num_layers * (num_experts + 1)).reshape(num_layers, num_experts + 1)[:, :num_experts]


@dataclass(frozen=True)
class Topology:
    """Workers grouped into nodes; every worker has the same number of expert slots."""

    num_nodes: int
    workers_per_node: int
    slots_per_worker: int

    def __post_init__(self) -> None:
        for name in ("num_nodes", "workers_per_node", "slots_per_worker"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"Topology.{name} must be >= 1, got {value}")

    @classmethod
    def flat(cls, num_workers: int, slots_per_worker: int) -> Topology:
        return cls(num_nodes=1, workers_per_node=num_workers, slots_per_worker=slots_per_worker)

    @property
    def num_workers(self) -> int:
        return self.num_nodes * self.workers_per_node

    @property
    def num_slots(self) -> int:
        return self.num_workers * self.slots_per_worker

    def worker_of_slot(self, slot):
        """Worker holding `slot` (int or int array)."""
        return np.floor_divide(slot, self.slots_per_worker)

    def node_of_worker(self, worker):
        """Node of `worker` (int or int array)."""
        return np.floor_divide(worker, self.workers_per_node)


@dataclass(frozen=True, eq=False)
class Placement:
    """Slot map for every MoE layer. Immutable; a rebalance produces a new Placement with version + 1.

    Invariants (checked by `validate`): values in [-1, E), every expert has >= 1 slot in every
    layer, and no worker holds two replicas of the same expert.
    """

    phy2log: np.ndarray  # [L, S] int64, FREE_SLOT for an empty slot
    num_experts: int
    slots_per_worker: int
    version: int = 0

    def __post_init__(self) -> None:
        phy2log = np.array(self.phy2log, dtype=np.int64, copy=True)
        if phy2log.ndim != 2:
            raise ValueError(f"phy2log must be [L, S], got shape {phy2log.shape}")
        if phy2log.shape[1] % self.slots_per_worker:
            raise ValueError(
                f"phy2log has {phy2log.shape[1]} slots, not a multiple of slots_per_worker={self.slots_per_worker}"
            )
        phy2log.setflags(write=False)
        object.__setattr__(self, "phy2log", phy2log)

    # ---- shape -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def num_workers(self) -> int:
        return self.num_slots // self.slots_per_worker

    # ---- derived maps --------------------------------------------------------------------------
    @cached_property
    def logcnt(self) -> np.ndarray:
        """[L, E] number of slots holding each expert."""
        counts = expert_counts(self.phy2log, self.num_experts)
        counts.setflags(write=False)
        return counts

    @cached_property
    def log2phy(self) -> np.ndarray:
        """[L, E, R] slots of each expert in ascending order, -1 padded."""
        max_rep = max(1, int(self.logcnt.max(initial=0)))
        out = np.full((self.num_layers, self.num_experts, max_rep), -1, dtype=np.int64)
        layer_idx, slot_idx = np.nonzero(self.phy2log >= 0)
        experts = self.phy2log[layer_idx, slot_idx]
        order = np.argsort((layer_idx * self.num_experts + experts) * self.num_slots + slot_idx)  # unique keys
        layer_idx, slot_idx, experts = layer_idx[order], slot_idx[order], experts[order]
        key = layer_idx * self.num_experts + experts
        # rank inside each run of equal keys: position minus the run's start (no binary search)
        position = np.arange(len(key))
        run_start = np.maximum.accumulate(np.where(np.concatenate([[True], key[1:] != key[:-1]]), position, 0))
        rank = position - run_start
        out[layer_idx, experts, rank] = slot_idx
        out.setflags(write=False)
        return out

    def slots_of_worker(self, worker: int) -> np.ndarray:
        """[L, slots_per_worker] logical expert in each of the worker's slots."""
        lo = worker * self.slots_per_worker
        return self.phy2log[:, lo : lo + self.slots_per_worker]

    # ---- checks --------------------------------------------------------------------------------
    def validate(self) -> Placement:
        """Raise ValueError naming the first broken invariant; return self for chaining."""
        bad = (self.phy2log < FREE_SLOT) | (self.phy2log >= self.num_experts)
        if bad.any():
            layer, slot = map(int, np.argwhere(bad)[0])
            raise ValueError(
                f"phy2log[{layer}, {slot}] = {int(self.phy2log[layer, slot])} is not an expert id in [0, {self.num_experts})"
            )
        missing = self.logcnt == 0
        if missing.any():
            layer, expert = map(int, np.argwhere(missing)[0])
            raise ValueError(f"layer {layer}: expert {expert} has no slot")
        per_worker = self.phy2log.reshape(self.num_layers, self.num_workers, self.slots_per_worker)
        for layer in range(self.num_layers):
            for worker in range(self.num_workers):
                held = per_worker[layer, worker]
                held = held[held >= 0]
                if len(np.unique(held)) != len(held):
                    values, counts = np.unique(held, return_counts=True)
                    raise ValueError(
                        f"layer {layer}: worker {worker} holds expert {int(values[counts > 1][0])} more than once"
                    )
        return self

    def with_phy2log(self, phy2log: np.ndarray) -> Placement:
        """The next version of this placement with a new slot map."""
        return Placement(phy2log, self.num_experts, self.slots_per_worker, self.version + 1)

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def contiguous(cls, num_layers: int, num_experts: int, num_workers: int, slots_per_worker: int) -> Placement:
        """Static baseline: expert e on worker e * N // E, in order; leftover slots are free.

        Equals `e // (E / N)` when N divides E, and spreads the remainder evenly when it does not.
        """
        if num_workers * slots_per_worker < num_experts:
            raise ValueError(
                f"{num_workers} workers x {slots_per_worker} slots = {num_workers * slots_per_worker} slots "
                f"cannot hold {num_experts} experts"
            )
        experts = np.arange(num_experts)
        worker = experts * num_workers // num_experts
        rank_in_worker = experts - np.searchsorted(worker, worker, side="left")
        if rank_in_worker.max(initial=0) >= slots_per_worker:
            raise ValueError(
                f"contiguous placement of {num_experts} experts on {num_workers} workers needs "
                f"{int(rank_in_worker.max()) + 1} slots per worker, got {slots_per_worker}"
            )
        row = np.full(num_workers * slots_per_worker, FREE_SLOT, dtype=np.int64)
        row[worker * slots_per_worker + rank_in_worker] = experts
        return cls(np.tile(row, (num_layers, 1)), num_experts, slots_per_worker)


@dataclass(frozen=True)
class Migration:
    """Slot copies that turn one placement into the next. Entry i: in layer `layer[i]`, slot
    `dst_slot[i]` receives expert `expert[i]`, copied from slot `src_slot[i]` of the old placement
    (a slot that already held it). All arrays are [N] int64.
    """

    layer: np.ndarray
    dst_slot: np.ndarray
    expert: np.ndarray
    src_slot: np.ndarray

    @property
    def num_copies(self) -> int:
        return int(len(self.dst_slot))

    def bytes_moved(self, bytes_per_expert: int) -> int:
        return self.num_copies * int(bytes_per_expert)


def migration_between(old: Placement, new: Placement, topology: Topology | None = None) -> Migration:
    """Slot copies needed to go from `old` to `new`.

    A slot needs a copy when the new placement puts an expert there that the old one did not. Its
    source is a slot of the old placement holding that expert, preferring (in order) the same
    worker, the same node, then the lowest slot id; slots on the same worker cost a local copy only.
    """
    if old.phy2log.shape != new.phy2log.shape:
        raise ValueError(f"placements differ in shape: {old.phy2log.shape} vs {new.phy2log.shape}")
    spw = old.slots_per_worker
    topology = topology or Topology.flat(old.num_workers, spw)
    changed = (new.phy2log != old.phy2log) & (new.phy2log >= 0)
    layers, dst = np.nonzero(changed)
    experts = new.phy2log[layers, dst]
    candidates_NR = old.log2phy[layers, np.maximum(experts, 0)]  # [N, R] old slots of each copied expert
    if len(dst) and (candidates_NR[:, 0] < 0).any():
        i = int(np.nonzero(candidates_NR[:, 0] < 0)[0][0])
        raise ValueError(f"layer {layers[i]}: expert {experts[i]} has no slot in the old placement to copy from")
    dst_worker_N = dst // spw
    cand_worker_NR = np.maximum(candidates_NR, 0) // spw
    cost_NR = (cand_worker_NR != dst_worker_N[:, None]).astype(np.int64) + (
        topology.node_of_worker(cand_worker_NR) != topology.node_of_worker(dst_worker_N)[:, None]
    )
    cost_NR[candidates_NR < 0] = 3  # padding: never chosen (the first entry always exists)
    src = np.take_along_axis(candidates_NR, np.argmin(cost_NR, axis=1)[:, None], axis=1)[:, 0]
    return Migration(layers.astype(np.int64), dst.astype(np.int64), experts.astype(np.int64), src.astype(np.int64))

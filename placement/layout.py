"""Placement and topology: which slot holds which logical expert (and which part of it).

Legend (docs/architecture.md "Shape legend"):
    L  MoE layers          E  logical experts per layer
    S  slots in the group  (= W * S_w; slot s lives on worker s // S_w)
    W  workers             R  max replicas of any expert in a layer
    X  slot copies of a migration (any number of rows)

A placement is `phy2log [L, S]` (slot -> logical expert, -1 for a free slot). `log2phy [L, E, R]`
(-1 padded, slots in ascending order) and `logcnt [L, E]` (slots per expert) are derived from it,
so they can never disagree with it. With sharded experts (`shard_width`, placement.shards) a slot
may hold part of an expert's FFN width; `num_replicas [L, E]` then counts replicas (sum of widths)
while `logcnt` still counts slots.

`Placement` is the one object that crosses actors: slot map, version, the replica split weights
and the shard widths travel together (the last two default to "equal split" and "whole experts").

Pure numpy: this package never imports ray, torch.distributed, triton or cuda.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from placement.shards import (
    WIDTH_TOLERANCE,
    check_widths,
    rank_in_runs,
    replica_structure,
    replica_weights_are_shared,
    shard_columns,
    whole_widths,
)

FREE_SLOT = -1

# link classes between two workers (Topology.link_class)
SAME_WORKER, INTRA_NODE, INTER_NODE = 0, 1, 2


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
    """Workers grouped into nodes; every worker has the same number of expert slots.

    Link classes: a worker talks to itself (no link), to the other workers of its node
    (`intra_node_gbps`, e.g. NVLink) and to workers of other nodes (`inter_node_gbps`, e.g.
    InfiniBand), in GB/s per worker per direction. None = unknown: the cost model
    (placement.cost) then uses its measured / documented defaults.
    """

    num_nodes: int
    workers_per_node: int
    slots_per_worker: int
    intra_node_gbps: float | None = None
    inter_node_gbps: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_nodes", "workers_per_node", "slots_per_worker"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"Topology.{name} must be >= 1, got {value}")
        for name in ("intra_node_gbps", "inter_node_gbps"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Topology.{name} must be > 0 GB/s or None, got {value}")

    @classmethod
    def flat(cls, num_workers: int, slots_per_worker: int, intra_node_gbps: float | None = None) -> Topology:
        return cls(num_nodes=1, workers_per_node=num_workers, slots_per_worker=slots_per_worker,
                   intra_node_gbps=intra_node_gbps)

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

    def link_class(self, worker_a, worker_b):
        """SAME_WORKER, INTRA_NODE or INTER_NODE between two workers (ints or int arrays)."""
        same_node = self.node_of_worker(worker_a) == self.node_of_worker(worker_b)
        return np.where(np.equal(worker_a, worker_b), SAME_WORKER, np.where(same_node, INTRA_NODE, INTER_NODE))


@dataclass(frozen=True, eq=False)
class Placement:
    """Slot map for every MoE layer. Immutable; a rebalance produces a new Placement with version + 1.

    Invariants (checked by `validate`): values in [-1, E), every expert has >= 1 slot in every
    layer, no worker holds two slots of the same expert; with shard widths, every replica's
    shards add up to one whole expert (placement.shards); with replica weights, every expert's
    replicas share its tokens (weights >= 0 summing to 1 over its replicas, the same on all
    shards of one replica, 0 on free slots).
    """

    phy2log: np.ndarray  # [L, S] int64, FREE_SLOT for an empty slot
    num_experts: int
    slots_per_worker: int
    version: int = 0
    replica_weights: np.ndarray | None = None  # [L, S] token share of the slot's replica; None = equal split
    shard_width: np.ndarray | None = None  # [L, S] fraction of F the slot holds; None = whole experts

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
        for name in ("replica_weights", "shard_width"):
            value = getattr(self, name)
            if value is None:
                continue
            value = np.array(value, dtype=np.float64, copy=True)
            if value.shape != phy2log.shape:
                raise ValueError(f"{name} has shape {value.shape}, phy2log {phy2log.shape}")
            value.setflags(write=False)
            object.__setattr__(self, name, value)

    def __reduce__(self):
        """Pickle (Ray ships placements between actors) through the constructor: the receiver gets
        its own read-only arrays (plain unpickling restores writable arrays, or views pinning the
        sender's buffers, and skips __post_init__), and the derived maps are not shipped."""
        return (type(self), (self.phy2log, self.num_experts, self.slots_per_worker, self.version,
                            self.replica_weights, self.shard_width))

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
        out[layer_idx, experts, rank_in_runs(layer_idx * self.num_experts + experts)] = slot_idx
        out.setflags(write=False)
        return out

    # ---- shards and split weights ----------------------------------------------------------------
    @property
    def width_LS(self) -> np.ndarray:
        """[L, S] fraction of F each slot holds (1.0 whole, 0.0 free)."""
        return whole_widths(self.phy2log) if self.shard_width is None else self.shard_width

    @cached_property
    def is_sharded(self) -> bool:
        """True when some held slot holds less than a whole expert."""
        return self.shard_width is not None and bool((self.shard_width[self.phy2log >= 0] < 1 - WIDTH_TOLERANCE).any())

    @cached_property
    def _replicas(self):
        return replica_structure(self.phy2log, self.width_LS, self.num_experts)

    @property
    def replica_of_slot(self) -> np.ndarray:
        """[L, S] index of the slot's replica within its expert (-1 free); = rank in log2phy when whole."""
        return self._replicas[0]

    @property
    def num_replicas(self) -> np.ndarray:
        """[L, E] replicas of each expert (sum of its widths; = logcnt without shards)."""
        return self._replicas[3]

    def shard_columns(self, ffn_width: int) -> np.ndarray:
        """[L, S, 2] int64 columns [start, stop) of F each slot holds; a replica's shards tile [0, F)."""
        return shard_columns(self._replicas[1], self._replicas[2], ffn_width)

    @property
    def weights_LS(self) -> np.ndarray:
        """[L, S] token share of each slot's replica: `replica_weights`, or 1 / replicas (equal split)."""
        if self.replica_weights is not None:
            return self.replica_weights
        held = self.phy2log >= 0
        replicas_LS = take_rows(self.num_replicas, np.where(held, self.phy2log, 0))
        return np.where(held, 1.0 / np.maximum(replicas_LS, 1), 0.0)

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
        if self.shard_width is not None:
            check_widths(self.phy2log, self.shard_width)
            self._replicas  # noqa: B018  (raises when a replica ends inside a slot)
        if self.replica_weights is not None:
            self._validate_weights()
        return self

    def _validate_weights(self) -> None:
        held = self.phy2log >= 0
        weights_LS = self.replica_weights
        bad = (weights_LS < 0) | (~held & (weights_LS != 0))
        if bad.any():
            layer, slot = map(int, np.argwhere(bad)[0])
            raise ValueError(f"replica_weights[{layer}, {slot}] = {weights_LS[layer, slot]}: weights are >= 0, and 0 on free slots")
        shared = replica_weights_are_shared(self.phy2log, self.replica_of_slot, weights_LS, self.num_experts)
        if not shared.all():
            layer, slot = map(int, np.argwhere(~shared)[0])
            raise ValueError(f"layer {layer}: slot {slot} has another weight than the first shard of its replica")
        # every replica counted once: divide each slot's weight by the replica's slot count
        per_replica_slots = np.ones_like(weights_LS)
        if self.is_sharded:
            key_LS = np.where(held, self.phy2log * (self.num_slots + 1) + self.replica_of_slot, -1)
            for layer in range(self.num_layers):
                _, inverse, counts = np.unique(key_LS[layer], return_inverse=True, return_counts=True)
                per_replica_slots[layer] = counts[inverse]
        num_layers, num_experts = self.num_layers, self.num_experts
        flat_LS = np.where(held, self.phy2log + (np.arange(num_layers) * num_experts)[:, None], num_layers * num_experts)
        sums_LE = np.bincount(flat_LS.ravel(), (weights_LS / per_replica_slots).ravel(), minlength=num_layers * num_experts + 1)
        sums_LE = sums_LE[:-1].reshape(num_layers, num_experts)
        off = np.abs(sums_LE - 1) > 1e-6
        if off.any():
            layer, expert = map(int, np.argwhere(off)[0])
            raise ValueError(f"layer {layer}: expert {expert}'s replica weights add up to {sums_LE[layer, expert]:.6f}, not 1")

    def with_phy2log(self, phy2log: np.ndarray, replica_weights: np.ndarray | None = None,
                     shard_width: np.ndarray | None = None) -> Placement:
        """The next version of this placement with a new slot map (and its weights / widths;
        those of this version do not carry over: they describe its own slot map)."""
        return Placement(phy2log, self.num_experts, self.slots_per_worker, self.version + 1, replica_weights, shard_width)

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def contiguous(cls, num_layers: int, num_experts: int, num_workers: int, slots_per_worker: int) -> Placement:
        """Static baseline: expert e on worker e * W // E, in order; leftover slots are free.

        Equals `e // (E / W)` when W divides E, and spreads the remainder evenly when it does not.
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


# Migrations live in placement.migration; re-exported here, where they used to be defined.
from placement.migration import Migration, migration_between  # noqa: F401

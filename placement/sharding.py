"""Sharded layouts of a layer, built from our planner's placements, and their per-batch evaluation.

Legend (docs/architecture.md): B batches, L layers, E experts, S slots (S_w per worker), W workers,
T tokens per step, K top-k, X any number of rows; local: g workers of a group.

A `Layout` is a slot map on a grid of "grid workers": real workers (g = 1), or groups of g real
workers that hold every slot of the group sharded g ways (width 1/g on each member). Evaluated on
the grid, each member computes 1/g of its group's rows and receives all of them. Layouts:

  replicate      `plan()`: whole experts and replicas (the per-batch split moves rows between replicas).
  shard_replicas the same slots, every replicated expert turned into one replica of shards with widths
                 = its planned weights: the same window balance; per batch no split is needed (each
                 shard does its width of every row), the weights of an expert are held once instead
                 of R times, and every row of it goes to R workers.
  group_g        `plan()` on W / g grid workers of g * S_w slots each; every slot sharded over its
                 group (contiguous ranks, so a group of g <= workers per node stays on one node).
                 Replicas across groups keep the per-batch split. g = W is full sharding (MoEShard):
                 every expert on every worker with width 1/W.
  pair_shards    for layers that replication cannot balance (a whole expert above a worker's share and
                 no slot to replicate it): the busiest worker's heaviest unreplicated expert h and a
                 light worker's lightest unreplicated expert c (or a free slot) are both sharded over
                 the two workers, h with width w on the busy one and c with 1 - w, so each worker
                 still holds one expert's bytes; w evens the two workers' loads.

`materialize` turns a layout into real-worker slot maps (shard widths, weights) for one Placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.batch_split import ReplicaUnits, split_batch
from placement.cost import StepCostModel
from placement.layout import FREE_SLOT, Topology, expert_counts, take_rows
from placement.metrics import per_worker, slot_loads
from placement.planner import PlannerOptions, plan

_EPS = 1e-9


@dataclass(frozen=True, eq=False)
class Layout:
    """One layout of every layer on its grid (see the module docstring)."""

    name: str
    phy2log_LS: np.ndarray  # [L, S'] on the grid: S' = (W / group_size) * slots_per_worker
    width_LS: np.ndarray  # [L, S'] fraction of F per grid slot (before the group's 1/g)
    weights_LS: np.ndarray  # [L, S'] planned token share of each slot's replica
    slots_per_worker: int  # per grid worker
    group_size: int = 1

    def units(self, num_experts: int) -> ReplicaUnits:
        return ReplicaUnits(self.phy2log_LS, self.slots_per_worker, num_experts, self.width_LS)


def replicate_layout(load_LE: np.ndarray, topology: Topology, options: PlannerOptions | None = None) -> Layout:
    result = plan(load_LE, topology, options=options)
    phy2log = result.placement.phy2log
    return Layout("replicate", phy2log, (phy2log >= 0).astype(np.float64), result.replica_weights, topology.slots_per_worker)


def shard_replicas_layout(replicate: Layout, num_experts: int) -> Layout:
    """`replicate` with every replicated expert's replicas turned into shards of one replica
    (widths = planned weights; a replica planned to take no tokens is dropped)."""
    phy2log_LS = replicate.phy2log_LS.copy()
    held = phy2log_LS >= 0
    count_LS = np.where(held, take_rows(expert_counts(phy2log_LS, num_experts), np.where(held, phy2log_LS, 0)), 0)
    replicated = held & (count_LS >= 2)
    width_LS = np.where(replicated, replicate.weights_LS, held.astype(np.float64))
    empty = replicated & (width_LS <= _EPS)
    phy2log_LS[empty], width_LS[empty] = FREE_SLOT, 0.0
    width_LS = _renormalise_shards(phy2log_LS, width_LS, num_experts)
    weights_LS = (phy2log_LS >= 0).astype(np.float64)  # one replica each: every shard takes every row
    return Layout("shard_replicas", phy2log_LS, width_LS, weights_LS, replicate.slots_per_worker)


def _renormalise_shards(phy2log_LS: np.ndarray, width_LS: np.ndarray, num_experts: int) -> np.ndarray:
    """Scale each expert's widths to sum to exactly 1 (float weights sum to 1 within ~1e-15)."""
    num_layers = len(phy2log_LS)
    held = phy2log_LS >= 0
    flat_LS = np.where(held, phy2log_LS + (np.arange(num_layers) * num_experts)[:, None], num_layers * num_experts)
    sums = np.bincount(flat_LS.ravel(), width_LS.ravel(), minlength=num_layers * num_experts + 1)
    return np.where(held, width_LS / np.where(sums[flat_LS] > 0, sums[flat_LS], 1.0), 0.0)


def group_layout(load_LE: np.ndarray, topology: Topology, group_size: int, options: PlannerOptions | None = None) -> Layout:
    """Workers in groups of `group_size`; `plan()` on the groups (see the module docstring)."""
    if topology.num_workers % group_size:
        raise ValueError(f"group size {group_size} does not divide {topology.num_workers} workers")
    grid = Topology.flat(topology.num_workers // group_size, topology.slots_per_worker * group_size)
    result = plan(load_LE, grid, options=options)
    phy2log = result.placement.phy2log
    name = "full_shard" if group_size == topology.num_workers else f"group_{group_size}"
    return Layout(name, phy2log, (phy2log >= 0).astype(np.float64), result.replica_weights, grid.slots_per_worker, group_size)


def pair_shards_layout(replicate: Layout, load_LE: np.ndarray, num_experts: int, tolerance: float = 0.02) -> Layout:
    """`replicate` with pair shards on the layers whose busiest worker is above (1 + tolerance) x
    the mean (see the module docstring); one extra slot per worker for the second shard.

    Pairs are formed in one pass: the i-th busiest worker above the target with the i-th
    lightest, each worker in at most one pair. w = (b_rest - a_rest + h - c) / (2 (h - c)) evens
    a_rest + w h + (1 - w) c and b_rest + (1 - w) h + w c; pairs with w outside (0, 1) are skipped
    (a whole swap would do, and the swap search already tried those)."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    spw = replicate.slots_per_worker
    num_layers, num_slots = replicate.phy2log_LS.shape
    num_workers = num_slots // spw
    wide = spw + 1  # slot index spw of every worker: the second shard of a pair
    phy2log_LWS = np.full((num_layers, num_workers, wide), FREE_SLOT, dtype=np.int64)
    phy2log_LWS[:, :, :spw] = replicate.phy2log_LS.reshape(num_layers, num_workers, spw)
    width_LWS = (phy2log_LWS >= 0).astype(np.float64)
    weights_LWS = np.zeros((num_layers, num_workers, wide))
    weights_LWS[:, :, :spw] = replicate.weights_LS.reshape(num_layers, num_workers, spw)
    tokens_LWS = np.zeros((num_layers, num_workers, wide))
    tokens_LWS[:, :, :spw] = slot_loads(load_LE, replicate.phy2log_LS, replicate.weights_LS).reshape(num_layers, num_workers, spw)
    count_LE = np.bincount((np.where(replicate.phy2log_LS >= 0, replicate.phy2log_LS, num_experts)
                            + (np.arange(num_layers) * (num_experts + 1))[:, None]).ravel(),
                           minlength=num_layers * (num_experts + 1)).reshape(num_layers, num_experts + 1)
    expert_LWS = np.where(phy2log_LWS >= 0, phy2log_LWS, num_experts)
    count_LWS = np.take_along_axis(count_LE, expert_LWS.reshape(num_layers, -1), axis=1).reshape(expert_LWS.shape)
    single_LWS = (count_LWS == 1) & (phy2log_LWS >= 0)  # unreplicated whole experts: what pairs may shard
    load_LW = tokens_LWS.sum(axis=2)
    target_L = load_LE.sum(axis=1) / num_workers * (1 + tolerance)
    order_LW = np.argsort(-load_LW, axis=1, kind="stable")
    for rank in range(num_workers // 2):
        layers = np.arange(num_layers)
        busy, light = order_LW[:, rank], order_LW[:, num_workers - 1 - rank]
        above = load_LW[layers, busy] > target_L * (1 + _EPS)
        a_slot = np.argmax(np.where(single_LWS[layers, busy], tokens_LWS[layers, busy], -np.inf), axis=1)
        has_h = single_LWS[layers, busy, a_slot]
        # partner's lightest unreplicated expert, or a free slot (load 0) among its first spw slots
        partner_tok = np.where(single_LWS[layers, light] | (phy2log_LWS[layers, light] < 0), tokens_LWS[layers, light], np.inf)
        partner_tok[:, spw] = np.inf  # the extra slot is the pair's, never a partner
        b_slot = np.argmin(partner_tok, axis=1)
        h, c = tokens_LWS[layers, busy, a_slot], tokens_LWS[layers, light, b_slot]
        a_rest, b_rest = load_LW[layers, busy] - h, load_LW[layers, light] - c
        with np.errstate(divide="ignore", invalid="ignore"):
            w = (b_rest - a_rest + h - c) / (2 * (h - c))
        ok = above & has_h & np.isfinite(partner_tok[layers, b_slot]) & (h > c) & (w > _EPS) & (w < 1 - _EPS)
        for layer in np.flatnonzero(ok):
            a, b, i, j, share = busy[layer], light[layer], a_slot[layer], b_slot[layer], float(w[layer])
            hot, cold = int(phy2log_LWS[layer, a, i]), int(phy2log_LWS[layer, b, j])
            # busy worker: share of h in its slot, 1 - share of c (if any) in its extra slot; the
            # light worker: 1 - share of h in its free slot j, or in its extra slot next to share of c
            h_slot = spw if cold >= 0 else j
            width_LWS[layer, a, i], weights_LWS[layer, a, i], tokens_LWS[layer, a, i] = share, 1.0, h[layer] * share
            width_LWS[layer, b, h_slot], phy2log_LWS[layer, b, h_slot] = 1 - share, hot
            weights_LWS[layer, b, h_slot], tokens_LWS[layer, b, h_slot] = 1.0, h[layer] * (1 - share)
            if cold >= 0:
                width_LWS[layer, b, j], tokens_LWS[layer, b, j] = share, c[layer] * share
                width_LWS[layer, a, spw], phy2log_LWS[layer, a, spw] = 1 - share, cold
                weights_LWS[layer, a, spw], tokens_LWS[layer, a, spw] = 1.0, c[layer] * (1 - share)
            load_LW[layer, a], load_LW[layer, b] = tokens_LWS[layer, a].sum(), tokens_LWS[layer, b].sum()
    shape = (num_layers, num_workers * wide)
    return Layout("pair_shards", phy2log_LWS.reshape(shape), width_LWS.reshape(shape), weights_LWS.reshape(shape), wide)


def materialize(layout: Layout, num_workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(phy2log_LS, width_LS, weights_LS, slots_per_worker) on the real workers: grid worker k's
    slot i becomes slot i of each of its members k * g .. k * g + g - 1, with width / g."""
    g = layout.group_size
    if g == 1:
        return layout.phy2log_LS, layout.width_LS, layout.weights_LS, layout.slots_per_worker
    num_layers = layout.phy2log_LS.shape[0]
    spw = layout.slots_per_worker

    def spread(values_LS, scale=1.0):
        grid_LGC = values_LS.reshape(num_layers, num_workers // g, 1, spw)
        return (np.broadcast_to(grid_LGC, (num_layers, num_workers // g, g, spw)) * scale).reshape(num_layers, num_workers * spw)

    phy2log = spread(layout.phy2log_LS).astype(np.int64)
    return phy2log, spread(layout.width_LS, 1.0 / g), spread(layout.weights_LS), spw


# ---- per-batch evaluation -----------------------------------------------------------------------------


def layer_times(layout: Layout, counts_BLE: np.ndarray, model: StepCostModel, topology: Topology, tokens: int,
                split: bool = True, units: ReplicaUnits | None = None, with_rows: bool = False):
    """([B, L] predicted layer seconds, [B, L] mean-worker seconds) of `layout` for each batch
    (with_rows: and [B, L, W] the pairs each real worker computes).

    split: per-batch water-fill (placement.batch_split); False: the planned weights' rule."""
    units = units or layout.units(counts_BLE.shape[2])
    rows_BLS = split_batch(units, counts_BLE, layout.weights_LS, sweeps=12 if split else 0, moves=4 if split else 0)
    g = layout.group_size
    compute = model.compute_seconds(rows_BLS, layout.width_LS / g, layout.slots_per_worker)  # [B, L, W / g]
    pairs = per_worker(rows_BLS.reshape(-1, rows_BLS.shape[2]), layout.slots_per_worker).reshape(compute.shape)
    if g > 1:
        compute, pairs = np.repeat(compute, g, axis=2), np.repeat(pairs, g, axis=2)
    exchange = model.exchange_seconds(pairs, tokens, topology)
    times = (model.layer_seconds(compute, exchange), model.mean_worker_seconds(compute, exchange))
    return (*times, pairs) if with_rows else times

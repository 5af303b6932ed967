"""Planner mode that chooses, per layer, between replicating and sharding experts by the cost model.

Legend (docs/architecture.md): B batches, L layers, E experts, S slots (S_w per worker), W workers,
T tokens per step, K top-k, X candidate layouts.

    result = plan_layout(load_LE, topology, StepCostModel(SHAPES["deepseek-v3"]), tokens=256)
    result.plan.placement   # one Placement: slot map, split weights, shard widths

1. Candidates (placement.sharding): replicate (ours, every slot), replicate on fewer slots per
   worker (down to no redundant slot: a replica streams a whole expert's weights, which a
   memory-bound step pays on the busiest worker), shard_replicas, groups of g = 2, 4, ... W
   (g = W: full sharding), and pair_shards when some layer is above the balance target. So the
   choice covers how many redundant slots to use, and replicate vs shard.
2. Each candidate's layer times on `planning_batches` batches sampled from the load at `tokens`
   tokens per step (multinomial counts, a seed of their own), with the per-batch split.
3. Per layer choice: start from the candidate whose uniform use has the lowest p99 step time,
   then coordinate descent, layer by layer, to the candidate that lowers the p99 of the step time
   (sum over layers) most; two passes. Gains below 0.1% of the step's p99 are planning noise and
   change nothing, and a change must not raise the p99 of either half of the planning batches
   (a layout that wins on a few tail batches only is an accident of the sample). So the choice is
   never worse, on the planning batches, than replicate-only, and no worse than another candidate
   used for every layer unless that one's win did not hold on both halves.
4. The chosen layers, materialised on the real workers and padded to the widest layer's slot
   count, make one Placement (version: current + 1, or 0).

Sampling independent batches from the window's load is the model of traffic here: real batches
also correlate across layers and steps, which this does not capture.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from placement.cost import StepCostModel
from placement.layout import FREE_SLOT, Migration, Placement, Topology, migration_between
from placement.metrics import imbalance_of_worker_loads, worker_loads
from placement.planner import Plan, PlannerOptions
from placement.sharding import (
    Layout,
    group_layout,
    layer_times,
    materialize,
    pair_shards_layout,
    replicate_layout,
    shard_replicas_layout,
)


def sample_counts(load_LE: np.ndarray, tokens: int, top_k: int, batches: int, rng: np.random.Generator) -> np.ndarray:
    """[B, L, E] int64 per-expert counts of `batches` steps of `tokens` tokens: each layer's
    tokens * top_k picks drawn from its load distribution (independent picks)."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    probs_LE = load_LE / np.maximum(load_LE.sum(axis=1, keepdims=True), 1e-300)
    counts = [rng.multinomial(tokens * top_k, p, size=batches) if p.sum() > 0 else np.zeros((batches, len(p)), dtype=np.int64)
              for p in probs_LE]
    return np.stack(counts, axis=1).astype(np.int64)


def group_sizes(num_workers: int) -> list[int]:
    """Powers of two dividing W, from 2 to W (W itself: full sharding)."""
    sizes, g = [], 2
    while g <= num_workers:
        if num_workers % g == 0:
            sizes.append(g)
        g *= 2
    if num_workers > 1 and num_workers not in sizes:
        sizes.append(num_workers)
    return sizes


def redundancy_levels(num_experts: int, topology: Topology) -> list[int]:
    """Slots per worker to try below the topology's: none redundant, halfway (fewest first)."""
    fewest = -(-num_experts // topology.num_workers)
    return sorted({fewest, (fewest + topology.slots_per_worker) // 2} - {topology.slots_per_worker})


def candidate_layouts(load_LE: np.ndarray, topology: Topology, options: PlannerOptions | None = None,
                      pair_tolerance: float = 0.02) -> list[Layout]:
    """Step 1 of the module docstring (replicate first: ties in the choice go to it)."""
    num_experts = load_LE.shape[1]
    replicate = replicate_layout(load_LE, topology, options)
    layouts = [replicate, shard_replicas_layout(replicate, num_experts)]
    for slots in redundancy_levels(num_experts, topology):
        fewer = replicate_layout(load_LE, Topology(topology.num_nodes, topology.workers_per_node, slots), options)
        layouts.append(replace(fewer, name=f"replicate_{slots}_slots"))
    layouts += [group_layout(load_LE, topology, g, options) for g in group_sizes(topology.num_workers)]
    loads_LW = worker_loads(load_LE, replicate.phy2log_LS, topology.slots_per_worker, replicate.weights_LS)
    if (imbalance_of_worker_loads(loads_LW) > 1 + pair_tolerance).any():
        layouts.append(pair_shards_layout(replicate, load_LE, num_experts, pair_tolerance))
    return layouts


def p99(step_B: np.ndarray) -> float:
    return float(np.quantile(step_B, 0.99))


def choose_per_layer(times_XBL: np.ndarray, passes: int = 2, min_gain: float = 1e-3,
                     confirm_halves: bool = True) -> np.ndarray:
    """[L] candidate index per layer (step 3 of the module docstring) from layer times [X, B, L].

    A change must lower the planning p99 by more than `min_gain` (relative): smaller differences
    are within the sampling noise of the planning batches, and candidate 0 (replicate) stays.
    `confirm_halves`: it must also not raise the p99 of either half of the batches (even / odd),
    so a layout that wins on a few tail batches only (an accident of the sample) is not taken."""
    num_candidates, num_batches, num_layers = times_XBL.shape
    halves = [np.arange(num_batches) % 2 == h for h in (0, 1)] if confirm_halves and num_batches >= 4 else []

    def better(new_B: np.ndarray, old_B: np.ndarray) -> bool:
        if p99(new_B) >= p99(old_B) * (1 - min_gain):
            return False
        return all(p99(new_B[half]) <= p99(old_B[half]) for half in halves)

    uniform_B = [times_XBL[c].sum(axis=1) for c in range(num_candidates)]
    start = int(np.argmin([p99(step_B) for step_B in uniform_B]))
    if start != 0 and not better(uniform_B[start], uniform_B[0]):
        start = 0
    choice_L = np.full(num_layers, start)
    step_B = times_XBL[choice_L, :, np.arange(num_layers)].sum(axis=0)
    for _ in range(passes):
        changed = False
        for layer in range(num_layers):
            without_B = step_B - times_XBL[choice_L[layer], :, layer]
            scores = [p99(without_B + times_XBL[c, :, layer]) for c in range(num_candidates)]
            pick = int(np.argmin(scores))
            candidate_B = without_B + times_XBL[pick, :, layer]
            if pick != choice_L[layer] and better(candidate_B, step_B):
                choice_L[layer], changed = pick, True
                step_B = candidate_B
        if not changed:
            break
    return choice_L


@dataclass(frozen=True, eq=False)
class LayoutPlan:
    plan: Plan  # placement with shard widths and weights; migration from `current`
    layouts: list  # the candidates (placement.sharding.Layout)
    choice_LAYERS: np.ndarray  # [L] index into layouts
    planning_p99_s: dict  # predicted p99 step seconds on the planning batches: per uniform candidate and "chosen"

    @property
    def layout_names(self) -> list[str]:
        return [self.layouts[c].name for c in self.choice_LAYERS]


def combine_layouts(layouts: list[Layout], choice_L: np.ndarray, num_workers: int, num_experts: int,
                    min_slots_per_worker: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Step 4: (phy2log_LS, width_LS, weights_LS, slots_per_worker) of the chosen layer of each
    layout, on real workers, every worker padded with free slots to the widest chosen layout."""
    real = {c: materialize(layouts[c], num_workers) for c in set(choice_L.tolist())}
    spw = max([min_slots_per_worker] + [real[c][3] for c in real])
    num_layers = len(choice_L)
    phy2log = np.full((num_layers, num_workers, spw), FREE_SLOT, dtype=np.int64)
    width, weights = np.zeros((num_layers, num_workers, spw)), np.zeros((num_layers, num_workers, spw))
    for c, (p, w, r, c_spw) in real.items():
        layers = np.flatnonzero(choice_L == c)
        phy2log[layers, :, :c_spw] = p[layers].reshape(len(layers), num_workers, c_spw)
        width[layers, :, :c_spw] = w[layers].reshape(len(layers), num_workers, c_spw)
        weights[layers, :, :c_spw] = r[layers].reshape(len(layers), num_workers, c_spw)
    shape = (num_layers, num_workers * spw)
    return phy2log.reshape(shape), width.reshape(shape), weights.reshape(shape), spw


def pad_slots(placement: Placement, slots_per_worker: int) -> Placement:
    """The same placement with every worker's slots padded with free ones to `slots_per_worker`
    (slot w * S_w + i becomes w * S_w' + i)."""
    extra = slots_per_worker - placement.slots_per_worker
    if extra < 0:
        raise ValueError(f"cannot pad {placement.slots_per_worker} slots per worker down to {slots_per_worker}")

    def pad(values, fill):
        if values is None:
            return None
        grid = np.asarray(values).reshape(placement.num_layers, placement.num_workers, placement.slots_per_worker)
        return np.pad(grid, ((0, 0), (0, 0), (0, extra)), constant_values=fill).reshape(placement.num_layers, -1)

    return Placement(pad(placement.phy2log, FREE_SLOT), placement.num_experts, slots_per_worker, placement.version,
                     pad(placement.replica_weights, 0.0), pad(placement.shard_width, 0.0))


def plan_layout(load_LE: np.ndarray, topology: Topology, model: StepCostModel, tokens: int,
                current: Placement | None = None, bytes_per_expert: int = 1, planning_batches: int = 128,
                seed: int = 12345, options: PlannerOptions | None = None) -> LayoutPlan:
    """Choose replicate / shard per layer for `tokens`-token steps (see the module docstring).

    With `current`, the new placement is version current.version + 1 and the migration is listed
    on the slot grid of the wider of the two (`pad_slots`: the engine grows its slot table first)."""
    started = time.perf_counter()
    load_LE = np.asarray(load_LE, dtype=np.float64)
    num_experts = load_LE.shape[1]
    layouts = candidate_layouts(load_LE, topology, options)
    counts_BLE = sample_counts(load_LE, tokens, model.shape.top_k, planning_batches, np.random.default_rng(seed))
    times_XBL = np.stack([layer_times(layout, counts_BLE, model, topology, tokens)[0] for layout in layouts])
    choice_L = choose_per_layer(times_XBL)
    chosen_B = times_XBL[choice_L, :, np.arange(len(choice_L))].sum(axis=0)
    planning = {layout.name: p99(times_XBL[c].sum(axis=1)) for c, layout in enumerate(layouts)}
    planning["chosen"] = p99(chosen_B)
    phy2log, width, weights, spw = combine_layouts(
        layouts, choice_L, topology.num_workers, num_experts, current.slots_per_worker if current is not None else 1)
    if current is None:
        placement = Placement(phy2log, num_experts, spw, 0, weights, width).validate()
        migration = Migration(*(np.zeros(0, dtype=np.int64) for _ in range(4)))
    else:
        padded = pad_slots(current, spw)
        placement = padded.with_phy2log(phy2log, weights, width).validate()
        migration = migration_between(padded, placement, Topology(topology.num_nodes, topology.workers_per_node, spw))
    predicted = imbalance_of_worker_loads(worker_loads(load_LE, phy2log, spw, weights, width))
    result = Plan(placement=placement, migration=migration, predicted_imbalance_LAYERS=predicted, replica_weights=weights,
                  planning_ms=(time.perf_counter() - started) * 1e3, bytes_moved=migration.bytes_moved(bytes_per_expert))
    return LayoutPlan(result, layouts, choice_L, planning)

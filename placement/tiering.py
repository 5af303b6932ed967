"""Which of a worker's experts live in device memory and which stay in host memory (issue 13's
host tier): a step-time model of the three ways to serve a cold expert, and a pure tiering
policy (state, load, now) -> (decision, new state) with hysteresis.

Legend (docs/architecture.md): L layers, E experts, W workers, X any number of experts.

A worker serves the experts its placement gives it; `budget` of them per layer fit in device
slots, the rest are cold. Per step, with r_e rows routed to expert e on this worker:

    device part  = floor + sum over resident e of r_e * device_row_s   (+ a fetch per touched cold
                   expert, mode "fetch": expert_bytes / pcie_bytes_per_s, the device waits for it)
    host part    = sum over touched cold e of host(r_e) + the rows' activations both ways over PCIe
                   (mode "host": computed where the weights live, beside the device part); host(r)
                   is the measured curve of one expert (TierRates.host_curve_*: weight streaming at
                   a few rows, the CPU's matmul rate at hundreds), else host_expert_s + r * host_row_s
    step         = max(device part, host part)   ("host": the two run at once; with a measured
                   overlap < 1 the shorter part hides only partly: TierRates.concurrent)
                   device part                   ("fetch")
A step model over mean rows per step (the policy's) counts an expert as touched with probability
1 - e^-r (Poisson arrivals); one over a step's actual rows (split_cold in the layer) counts r > 0.

All experts of one model have the same size and the row costs are per row, so for a fixed budget
the hottest experts resident is the best choice for "fetch", and for "host" while the host part is
the longer one (the usual case: a host row costs tens of device rows; moving a hotter expert onto
the device then shortens the step most). A device-bound "host" step could gain from leaving a hot
expert on the host, which this policy does not try (`step_seconds` lets a caller compare). The
policy keeps the resident set from flapping on noise: a cold expert replaces the coolest resident
one only when its load is `margin` above it, at most `max_swaps` per layer and decision, after a
cooldown. The rates are inputs measured on the machine (TierRates), never constants here.

On a worker the tier of an expert is the position of its slot: local slots [0, budget) are in
device memory, the rest in host memory. A promotion swaps a cold expert's slot with a resident
one's on the same worker (`placement_tiers`, `arrange_tiers`), so the coordinator's staged
migration carries it out like any other slot move: no stall, commit at a step boundary.

Pure numpy: the coordinator calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.cold_split import ColdSplit, split_cold, split_cold_steps  # noqa: F401 (re-exported)
from placement.layout import Placement


@dataclass(frozen=True)
class TierRates:
    """Measured rates of one worker's machine for one model's experts (moeray.host_tier.measure_rates)."""

    device_row_s: float  # seconds per routed row of one expert on the device (grouped kernel, rows-bound)
    host_row_s: float  # seconds per routed row computed on the host (CPU grouped kernel, its threads)
    pcie_bytes_per_s: float  # host <-> device copy rate (pinned memory)
    expert_bytes: float  # one expert's weights
    row_bytes: float  # one row's activations (hidden x dtype bytes), each way
    device_floor_s: float = 0.0  # a launch's fixed cost
    host_expert_s: float = 0.0  # a touched host expert's fixed cost (its weights stream from host memory once)
    # how much of the shorter of (device part, host part) hides under the longer when both run: 1
    # fully (max), 0 not at all (they add up: e.g. the fetches' DMA and the host compute share one
    # host memory bandwidth); measured by running both at once
    overlap: float = 1.0
    # measured seconds of one touched cold expert on the host at these row counts (ascending, from
    # 1 row to prefill sizes): the host's cost is not affine in rows (few rows stream the weights
    # from memory; hundreds are bound by the CPU's matmul rate), so where given it replaces
    # host_expert_s + rows x host_row_s; linear between points, the last slope past the last one
    host_curve_rows: tuple = ()
    host_curve_s: tuple = ()
    # the host's measured time over the model's in the layer that runs it (HostSlots' calibration)
    host_scale: float = 1.0
    # a step's fixed cost of computing anything on the host, on the host part's path: from the
    # device part's start to the host math's start (the rows' trip to the host); 0 as measured,
    # HostCalibration adds what a GPU worker's layer steps show
    host_start_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("device_row_s", "host_row_s", "pcie_bytes_per_s", "expert_bytes", "row_bytes"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"TierRates.{name} must be finite and > 0, got {value}")
        for name in ("device_floor_s", "host_expert_s", "host_start_s"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"TierRates.{name} must be finite and >= 0, got {value}")
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"TierRates.overlap must be in [0, 1], got {self.overlap}")
        if not np.isfinite(self.host_scale) or self.host_scale <= 0:
            raise ValueError(f"TierRates.host_scale must be finite and > 0, got {self.host_scale}")
        rows, secs = np.asarray(self.host_curve_rows, dtype=np.float64), np.asarray(self.host_curve_s, dtype=np.float64)
        if rows.shape != secs.shape or rows.ndim != 1:
            raise ValueError(f"TierRates.host_curve_rows {self.host_curve_rows} and host_curve_s {self.host_curve_s} "
                             "must be two lists of one length")
        if len(rows) and (rows[0] < 1 or np.any(np.diff(rows) <= 0) or not np.all(np.isfinite(secs)) or np.any(secs <= 0)):
            raise ValueError(f"TierRates host curve needs ascending rows >= 1 and finite seconds > 0, got rows "
                             f"{self.host_curve_rows}, seconds {self.host_curve_s}")

    @property
    def fetch_expert_s(self) -> float:
        """Seconds to copy one expert's weights to a device staging slot."""
        return self.expert_bytes / self.pcie_bytes_per_s

    def host_expert_seconds(self, rows_X: np.ndarray) -> np.ndarray:
        """[X] seconds of each expert's rows on the host (0 rows: 0), activations excluded."""
        rows_X = np.asarray(rows_X, dtype=np.float64)
        if len(self.host_curve_rows) >= 2:
            at, secs = np.asarray(self.host_curve_rows, dtype=np.float64), np.asarray(self.host_curve_s, dtype=np.float64)
            slope = (secs[-1] - secs[-2]) / (at[-1] - at[-2])
            cost_X = np.where(rows_X > at[-1], secs[-1] + (rows_X - at[-1]) * max(slope, 0.0), np.interp(rows_X, at, secs))
        else:
            cost_X = self.host_expert_s + rows_X * self.host_row_s
        return np.where(rows_X > 0, cost_X * self.host_scale, 0.0)

    def host_costs(self, rows_X: np.ndarray, expected: bool = False) -> np.ndarray:
        """[X] seconds each cold expert adds on the host: its rows' compute (touched ones only) and
        their activations both ways. expected: rows_X are mean rows per step (an expert is touched
        with probability p = 1 - e^-rows, and then carries rows / p on average)."""
        rows_X = np.asarray(rows_X, dtype=np.float64)
        moved_X = rows_X * 2 * self.row_bytes / self.pcie_bytes_per_s
        if not expected:
            return self.host_expert_seconds(rows_X) + moved_X
        p_X = -np.expm1(-rows_X)
        given_touched_X = np.divide(rows_X, p_X, out=np.zeros_like(rows_X), where=p_X > 0)
        return p_X * self.host_expert_seconds(given_touched_X) + moved_X

    def fetch_costs(self, rows_X: np.ndarray, expected: bool = False) -> np.ndarray:
        """[X] device seconds each cold expert adds when fetched: its copy (if touched), its rows."""
        rows_X = np.asarray(rows_X, dtype=np.float64)
        touched_X = -np.expm1(-rows_X) if expected else (rows_X > 0).astype(np.float64)
        return touched_X * self.fetch_expert_s + rows_X * self.device_row_s

    def host_seconds(self, rows_X: np.ndarray, expected: bool = False) -> float:
        """Host part of these cold experts (TierRates.host_costs summed, and the host's start cost
        if any is touched)."""
        return float(self.with_host_start(self.host_costs(rows_X, expected).sum()))

    def with_host_start(self, host_s):
        """A host part (array or scalar) with the step's start cost added where it is not 0."""
        return host_s + self.host_start_s * (np.asarray(host_s) > 0)

    def fetch_seconds(self, rows_X: np.ndarray, expected: bool = False) -> float:
        """Device time these cold experts add when fetched (TierRates.fetch_costs summed)."""
        return float(self.fetch_costs(rows_X, expected).sum())

    def concurrent(self, device_s: float, host_s: float) -> float:
        """The step of a device part and a host part that run at once."""
        return device_s + host_s - self.overlap * min(device_s, host_s)


def touched(rows_X: np.ndarray, expected: bool = False) -> float:
    """How many of these experts a step touches: those with rows, or (expected: rows are per-step
    means of Poisson arrivals) the sum of 1 - e^-rows."""
    rows_X = np.asarray(rows_X, dtype=np.float64)
    return float((-np.expm1(-rows_X)).sum()) if expected else float((rows_X > 0).sum())


def step_seconds(rows_X: np.ndarray, resident_X: np.ndarray, rates: TierRates, mode: str = "host",
                 host_margin: float = 0.0) -> float:
    """Predicted seconds of one layer step on one worker: rows_X (mean rows per step, Poisson)
    routed to each of its experts, resident_X True for the device-resident ones; mode "host" (cold
    experts computed in host memory, beside the device), "fetch" (cold experts copied to the device
    on demand) or "auto" (per cold expert, whichever `split_cold` picks, with `host_margin`)."""
    rows_X = np.asarray(rows_X, dtype=np.float64)
    resident_X = np.asarray(resident_X, dtype=bool)
    device = rates.device_floor_s + float(rows_X[resident_X].sum()) * rates.device_row_s
    cold = rows_X[~resident_X]
    if mode == "fetch":
        return device + rates.fetch_seconds(cold, expected=True)
    if mode == "auto":
        return split_cold_steps(cold, rates, device, expected=True, host_margin=host_margin).step_s
    if mode != "host":
        raise ValueError(f"mode must be 'host', 'fetch' or 'auto', got {mode!r}")
    return rates.concurrent(device, rates.host_seconds(cold, expected=True))


def hottest(load_X: np.ndarray, budget: int) -> np.ndarray:
    """[X] bool: the `budget` most loaded experts (ties to the lower index)."""
    load_X = np.asarray(load_X, dtype=np.float64)
    if not 0 <= budget:
        raise ValueError(f"budget must be >= 0, got {budget}")
    order = np.lexsort((np.arange(len(load_X)), -load_X))
    resident = np.zeros(len(load_X), dtype=bool)
    resident[order[:budget]] = True
    return resident


@dataclass(frozen=True)
class TierConfig:
    budget: int  # device slots per layer on this worker
    margin: float = 0.2  # a cold expert must carry (1 + margin) x the coolest resident one's load
    max_swaps: int = 2  # promotions (each with a demotion) per layer and decision
    cooldown_s: float = 5.0  # between two decisions that move anything
    min_gain: float = 0.0  # placement_tiers: a worker's swaps must shorten its modelled step by this fraction
    mode: str = "host"  # how the worker serves cold experts (step_seconds' mode), for the gain check
    host_margin: float = 0.0  # mode "auto": the worker's tier.host_margin (its split, modelled as it runs)
    # placement_tiers: a worker's swaps must repay their copies (an expert up, one down, over PCIe)
    # within this many steps of the modelled gain; 0: no such check
    payback_steps: float = 0.0

    def __post_init__(self) -> None:
        if self.budget < 0 or self.margin < 0 or self.max_swaps < 1 or self.cooldown_s < 0 or self.min_gain < 0 \
                or self.payback_steps < 0:
            raise ValueError(f"invalid TierConfig {self}")


@dataclass(frozen=True)
class TierState:
    resident_LX: np.ndarray  # [L, X] bool: which of the worker's experts are on the device now
    last_change_s: float | None = None


@dataclass(frozen=True)
class TierDecision:
    resident_LX: np.ndarray  # the resident set to move to ([L, X] bool)
    promoted: tuple  # ((layer, expert index), ...) moved onto the device
    demoted: tuple  # ((layer, expert index), ...) moved off it
    reason: str

    @property
    def changes(self) -> bool:
        return bool(self.promoted)


def initial_tiers(load_LX: np.ndarray, config: TierConfig) -> TierState:
    """The hottest `budget` experts of every layer resident (no hysteresis: nothing is resident yet)."""
    return TierState(np.stack([hottest(row, config.budget) for row in np.asarray(load_LX)]))


def decide_tiers(state: TierState, load_LX: np.ndarray, now: float, config: TierConfig) -> tuple[TierDecision, TierState]:
    """Swap cold experts onto the device where they out-carry the coolest resident one by the
    margin (hottest cold first, coolest resident out first, at most max_swaps per layer), after the
    cooldown. Pure: the same (state, load, now) always gives the same answer."""
    load_LX = np.asarray(load_LX, dtype=np.float64)
    resident_LX = np.array(state.resident_LX, dtype=bool, copy=True)
    if load_LX.shape != resident_LX.shape:
        raise ValueError(f"load has shape {load_LX.shape}, the resident set {resident_LX.shape}")
    if state.last_change_s is not None and now - state.last_change_s < config.cooldown_s:
        return TierDecision(resident_LX, (), (), "cooldown"), state
    promoted, demoted = [], []
    for layer, (load_X, resident_X) in enumerate(zip(load_LX, resident_LX)):
        cold = [int(x) for x in np.lexsort((np.arange(len(load_X)), -load_X)) if not resident_X[x]]  # hottest first
        warm = [int(x) for x in np.lexsort((np.arange(len(load_X)), load_X)) if resident_X[x]]  # coolest first
        for hot, cool in zip(cold[:config.max_swaps], warm[:config.max_swaps]):
            if load_X[hot] <= (1 + config.margin) * load_X[cool]:
                break  # the lists are sorted: no later pair clears the margin either
            resident_X[hot], resident_X[cool] = True, False
            promoted.append((layer, hot))
            demoted.append((layer, cool))
    if not promoted:
        return TierDecision(resident_LX, (), (), "every resident expert within the margin"), state
    reason = f"{len(promoted)} promotions past a {config.margin:.0%} margin"
    return TierDecision(resident_LX, tuple(promoted), tuple(demoted), reason), TierState(resident_LX, now)


# ---- placements: the tier of a slot is its position on its worker ---------------------------------
def slot_loads(placement: Placement, load_LE: np.ndarray, worker: int) -> np.ndarray:
    """[L, S_w] load each of the worker's slots carries (its expert's load x the slot's split weight)."""
    lo, spw = worker * placement.slots_per_worker, placement.slots_per_worker
    experts_LS = placement.slots_of_worker(worker)
    weights_LS = placement.weights_LS[:, lo:lo + spw]
    load_LS = np.take_along_axis(np.asarray(load_LE, dtype=np.float64), np.maximum(experts_LS, 0), axis=1)
    return np.where(experts_LS >= 0, load_LS * weights_LS, 0.0)


def swap_slots(placement: Placement, swaps: list[tuple[int, int, int]]) -> Placement:
    """The next version with the (layer, global slot a, global slot b) pairs exchanged (experts and
    split weights move together; both slots are on one worker, so worker loads do not change)."""
    if placement.is_sharded:
        raise ValueError("the host tier holds whole experts: a sharded placement cannot be tiered")
    phy2log = np.array(placement.phy2log, copy=True)
    weights = None if placement.replica_weights is None else np.array(placement.replica_weights, copy=True)
    spw = placement.slots_per_worker
    for layer, a, b in swaps:
        if a // spw != b // spw:
            raise ValueError(f"layer {layer}: slots {a} and {b} are on different workers")
        phy2log[layer, [a, b]] = phy2log[layer, [b, a]]
        if weights is not None:
            weights[layer, [a, b]] = weights[layer, [b, a]]
    return placement.with_phy2log(phy2log, weights)


def arrange_tiers(placement: Placement, load_LE: np.ndarray, budget: int) -> Placement:
    """`placement` (same version) with every worker's `budget` most loaded experts in its device
    slots; experts already in the right tier keep their slots (the fewest moves). Used on the
    planner's placements, which know nothing of tiers."""
    swaps = []
    spw = placement.slots_per_worker
    for worker in range(placement.num_workers):
        held_LS = placement.slots_of_worker(worker) >= 0
        # a free slot is the coolest of all: an expert with no load still goes before it
        load_LS = np.where(held_LS, slot_loads(placement, load_LE, worker), -1.0)
        for layer, load_X in enumerate(load_LS):
            want_X = hottest(load_X, budget)
            up = [int(x) for x in np.flatnonzero(want_X[budget:]) + budget]
            down = [int(x) for x in np.flatnonzero(~want_X[:budget])]
            swaps += [(layer, worker * spw + a, worker * spw + b) for a, b in zip(up, down)]
    if not swaps:
        return placement
    swapped = swap_slots(placement, swaps)
    return Placement(swapped.phy2log, placement.num_experts, spw, placement.version, swapped.replica_weights)


@dataclass(frozen=True)
class TierPlan:
    placement: Placement | None  # the next version (None: no change)
    reason: str
    promotions: int = 0
    predicted_step_s: tuple = ()  # per worker (before, after) modelled step seconds summed over layers


def swap_seconds(swaps: int, rates: TierRates) -> float:
    """PCIe time of `swaps` tier swaps: each moves one expert onto the device and one off it."""
    return swaps * 2.0 * rates.expert_bytes / rates.pcie_bytes_per_s


def placement_tiers(placement: Placement, load_LE: np.ndarray, steps: float, now: float, config: TierConfig,
                    last_change_s: float | None, rates: TierRates | None) -> tuple[TierPlan, float | None]:
    """(plan, new last_change_s): decide_tiers on every worker's slots (resident = the first
    `budget`), kept on a worker only where the modelled step (`rates`, rows per step = load /
    steps) gets at least `min_gain` shorter. rates=None: the margin alone decides."""
    if last_change_s is not None and now - last_change_s < config.cooldown_s:
        return TierPlan(None, "tier cooldown"), last_change_s
    spw, budget = placement.slots_per_worker, min(config.budget, placement.slots_per_worker)
    resident_X = np.arange(spw) < budget
    swaps, figures = [], []
    for worker in range(placement.num_workers):
        load_LX = slot_loads(placement, load_LE, worker)
        decision, _ = decide_tiers(TierState(np.tile(resident_X, (placement.num_layers, 1))), load_LX, now, config)
        if not decision.changes:
            continue
        if rates is not None:
            rows_LX = load_LX / max(steps, 1e-12)
            before = sum(step_seconds(rows, resident_X, rates, config.mode, config.host_margin) for rows in rows_LX)
            after = sum(step_seconds(rows, res, rates, config.mode, config.host_margin)
                        for rows, res in zip(rows_LX, decision.resident_LX))
            if before - after < config.min_gain * before:
                continue
            if config.payback_steps and \
                    (before - after) * config.payback_steps < swap_seconds(len(decision.promoted), rates):
                continue
            figures.append((worker, before, after))
        lo = worker * spw
        swaps += [(layer, lo + hot, lo + cool) for (layer, hot), (_, cool) in zip(decision.promoted, decision.demoted)]
    if not swaps:
        repaid = f", repaid within {config.payback_steps:g} steps" if config.payback_steps and rates is not None else ""
        return TierPlan(None, f"no worker gains {config.min_gain:.0%}{repaid} from a tier swap past the margin"), \
            last_change_s
    reason = f"tiering: {len(swaps)} promotions past a {config.margin:.0%} margin"
    if figures:
        reason += "; modelled step " + ", ".join(f"w{w} {1e3 * b:.3f} -> {1e3 * a:.3f} ms" for w, b, a in figures)
    return TierPlan(swap_slots(placement, swaps), reason, len(swaps), tuple(figures)), now

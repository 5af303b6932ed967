"""Which of a worker's experts live in device memory and which stay in host memory (issue 13's
host tier): a step-time model of the three ways to serve a cold expert, and a pure tiering
policy (state, load, now) -> (decision, new state) with hysteresis.

Legend (docs/architecture.md): L layers, E experts, W workers, X any number of experts.

A worker serves the experts its placement gives it; `budget` of them per layer fit in device
slots, the rest are cold. Per step, with r_e rows routed to expert e on this worker:

    device part  = floor + sum over resident e of r_e * device_row_s   (+ a fetch per touched cold
                   expert, mode "fetch": expert_bytes / pcie_bytes_per_s, the device waits for it)
    host part    = sum over cold e of r_e * host_row_s + the rows' activations both ways over PCIe
                   (mode "host": computed where the weights live, beside the device part)
    step         = max(device part, host part)   ("host": the two run at once)
                   device part                   ("fetch")

All experts of one model have the same size and the row costs are per row, so for a fixed budget
the hottest experts resident is the best choice for "fetch", and for "host" while the host part is
the longer one (the usual case: a host row costs tens of device rows; moving a hotter expert onto
the device then shortens the step most). A device-bound "host" step could gain from leaving a hot
expert on the host, which this policy does not try (`step_seconds` lets a caller compare). The
policy keeps the resident set from flapping on noise: a cold expert replaces the coolest resident
one only when its load is `margin` above it, at most `max_swaps` per layer and decision, after a
cooldown. The rates are inputs measured on the machine (TierRates), never constants here.

Pure numpy: the coordinator calls it; promotions and demotions are slot moves of the staged
migration (not wired yet: see docs/architecture.md, Not built yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TierRates:
    """Measured rates of one worker's machine for one model's experts."""

    device_row_s: float  # seconds per routed row of one expert on the device (grouped kernel, rows-bound)
    host_row_s: float  # seconds per routed row computed on the host (CPU grouped kernel, its threads)
    pcie_bytes_per_s: float  # host <-> device copy rate (pinned memory)
    expert_bytes: float  # one expert's weights
    row_bytes: float  # one row's activations (hidden x dtype bytes), each way
    device_floor_s: float = 0.0  # a launch's fixed cost

    def __post_init__(self) -> None:
        for name in ("device_row_s", "host_row_s", "pcie_bytes_per_s", "expert_bytes", "row_bytes"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"TierRates.{name} must be finite and > 0, got {value}")


def step_seconds(rows_X: np.ndarray, resident_X: np.ndarray, rates: TierRates, mode: str = "host") -> float:
    """Predicted seconds of one layer step on one worker: rows_X routed to each of its experts,
    resident_X True for the device-resident ones; mode "host" (cold experts computed in host
    memory, overlapped with the device) or "fetch" (cold experts copied to the device on demand)."""
    rows_X = np.asarray(rows_X, dtype=np.float64)
    resident_X = np.asarray(resident_X, dtype=bool)
    device = rates.device_floor_s + float(rows_X[resident_X].sum()) * rates.device_row_s
    cold = rows_X[~resident_X]
    if mode == "fetch":
        touched = int((cold > 0).sum())
        return device + float(cold.sum()) * rates.device_row_s + touched * rates.expert_bytes / rates.pcie_bytes_per_s
    if mode != "host":
        raise ValueError(f"mode must be 'host' or 'fetch', got {mode!r}")
    host = float(cold.sum()) * (rates.host_row_s + 2 * rates.row_bytes / rates.pcie_bytes_per_s)
    return max(device, host)


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

    def __post_init__(self) -> None:
        if self.budget < 0 or self.margin < 0 or self.max_swaps < 1 or self.cooldown_s < 0:
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

"""When to rebalance: a pure function (state, stats, now) -> (decision, new state).

Gain = current mean imbalance / predicted mean imbalance after the re-plan. Rebalance when:
enough tokens were observed, the cooldown since the last rebalance has passed, and the gain has
been >= `min_gain` on `confirmations` consecutive checks (hysteresis against noise). The
planner's prediction may be given lazily (a callable) so it is only computed when the cheap
checks pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class PolicyConfig:
    min_gain: float = 1.05  # current / predicted mean imbalance needed to act
    cooldown_s: float = 60.0  # seconds between two rebalances
    min_tokens: float = 10_000  # routed tokens in the load window before any decision
    confirmations: int = 2  # consecutive checks with enough gain
    min_bytes_gain: float = 0.0  # optional: required (gain - 1) per GB moved; 0 disables

    def __post_init__(self) -> None:
        if self.min_gain < 1.0:
            raise ValueError(f"min_gain must be >= 1.0, got {self.min_gain}")
        if self.cooldown_s < 0 or self.min_tokens < 0 or self.confirmations < 1:
            raise ValueError(f"invalid PolicyConfig {self}")


@dataclass(frozen=True)
class PolicyState:
    last_rebalance_s: float | None = None
    streak: int = 0  # consecutive checks with gain >= min_gain


@dataclass(frozen=True)
class PolicyStats:
    current_imbalance: float | np.ndarray  # mean imbalance, or per-layer [L]
    predicted_imbalance: float | np.ndarray | Callable[[], float | np.ndarray]
    tokens: float
    bytes_to_move: float | Callable[[], float] = 0.0


@dataclass(frozen=True)
class Decision:
    rebalance: bool
    reason: str
    gain: float | None = None


def _mean(value) -> float:
    value = value() if callable(value) else value
    return float(np.mean(value))


def decide(state: PolicyState, stats: PolicyStats, now: float, config: PolicyConfig) -> tuple[Decision, PolicyState]:
    if stats.tokens < config.min_tokens:
        return Decision(False, f"only {stats.tokens:.0f} tokens observed (< {config.min_tokens:.0f})"), replace(state, streak=0)
    if state.last_rebalance_s is not None and now - state.last_rebalance_s < config.cooldown_s:
        left = config.cooldown_s - (now - state.last_rebalance_s)
        return Decision(False, f"cooldown: {left:.1f}s left"), state
    current = _mean(stats.current_imbalance)
    predicted = _mean(stats.predicted_imbalance)
    gain = current / predicted if predicted > 0 else 1.0
    if gain < config.min_gain:
        return Decision(False, f"gain {gain:.3f} < {config.min_gain}", gain), replace(state, streak=0)
    if config.min_bytes_gain > 0:
        gigabytes = _mean(stats.bytes_to_move) / 1e9
        if gigabytes > 0 and (gain - 1.0) / gigabytes < config.min_bytes_gain:
            return Decision(False, f"gain {gain:.3f} does not pay for {gigabytes:.2f} GB", gain), replace(state, streak=0)
    streak = state.streak + 1
    if streak < config.confirmations:
        return Decision(False, f"gain {gain:.3f}: confirmation {streak}/{config.confirmations}", gain), replace(
            state, streak=streak
        )
    return Decision(True, f"gain {gain:.3f} >= {config.min_gain}", gain), PolicyState(last_rebalance_s=now, streak=0)


def decision_metric(imbalance_L: np.ndarray) -> float:
    """What the policy's gain compares: (mean over layers + worst layer) / 2."""
    return 0.5 * (float(np.mean(imbalance_L)) + float(np.max(imbalance_L)))

"""Load estimates from per-step expert counts.

Shapes:
    L  MoE layers    E  logical experts

Both estimators are immutable: `update(counts_LE, steps=1)` returns a new object and leaves
the old one untouched (safe to share between the coordinator loop and a planner thread).
`counts_LE` is the number of (token, k) routings per expert summed over `steps` steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _as_counts(counts_LE) -> np.ndarray:
    counts_LE = np.asarray(counts_LE, dtype=np.float64)
    if counts_LE.ndim != 2:
        raise ValueError(f"counts must be [L, E], got shape {counts_LE.shape}")
    if (counts_LE < 0).any():
        raise ValueError("counts must be >= 0")
    return counts_LE


@dataclass(frozen=True)
class LoadWindow:
    """Sum of counts over the most recent `max_steps` steps.

    Snapshots covering several steps are kept whole: the window holds the newest snapshots whose
    steps add up to `max_steps`, plus at most part of one older snapshot's steps (never fewer).
    """

    max_steps: int
    chunks: tuple = ()  # ((steps, counts_LE), ...) oldest first

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"LoadWindow.max_steps must be >= 1, got {self.max_steps}")

    def update(self, counts_LE, steps: int = 1) -> LoadWindow:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        chunks = self.chunks + ((int(steps), _as_counts(counts_LE)),)
        total = sum(s for s, _ in chunks)
        while total - chunks[0][0] >= self.max_steps:  # drop whole chunks that fell out of the window
            total -= chunks[0][0]
            chunks = chunks[1:]
        return LoadWindow(self.max_steps, chunks)

    @property
    def steps(self) -> int:
        return sum(s for s, _ in self.chunks)

    @property
    def load_LE(self) -> np.ndarray:
        """[L, E] routed tokens over the window (empty window: raises)."""
        if not self.chunks:
            raise ValueError("LoadWindow has no data yet")
        return np.sum([c for _, c in self.chunks], axis=0)


@dataclass(frozen=True)
class DecayedLoad:
    """Exponentially decayed sum of counts: a step's counts lose half their weight every
    `half_life_steps` steps. `load_LE` is in tokens (about half_life / ln 2 steps' worth in steady state)."""

    half_life_steps: float
    load: np.ndarray | None = field(default=None, repr=False)
    steps: int = 0
    # steps' worth of counts `load` holds (each update's steps, decayed like its counts):
    # load_LE / effective_steps is a per-step load
    effective_steps: float = 0.0

    def __post_init__(self) -> None:
        if self.half_life_steps <= 0:
            raise ValueError(f"half_life_steps must be > 0, got {self.half_life_steps}")

    def update(self, counts_LE, steps: int = 1) -> DecayedLoad:
        counts_LE = _as_counts(counts_LE)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        decay = 0.5 ** (steps / self.half_life_steps)
        new = counts_LE if self.load is None else self.load * decay + counts_LE
        return DecayedLoad(self.half_life_steps, new, self.steps + int(steps), self.effective_steps * decay + steps)

    @property
    def load_LE(self) -> np.ndarray:
        if self.load is None:
            raise ValueError("DecayedLoad has no data yet")
        return self.load


def load_shift(a_LE: np.ndarray, b_LE: np.ndarray) -> float:
    """Mean over layers of the total-variation distance between two loads' expert distributions
    (0: same shape, 1: disjoint). Per-batch noise keeps it small; a drift of hot experts does not."""
    a = a_LE / np.maximum(a_LE.sum(axis=1, keepdims=True), 1e-12)
    b = b_LE / np.maximum(b_LE.sum(axis=1, keepdims=True), 1e-12)
    return float(0.5 * np.abs(a - b).sum(axis=1).mean())

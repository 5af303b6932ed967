"""Whether a worker's host bets pay, measured (issue 13's host tier): a two-armed trial between
the split the step model proposes (some touched cold experts computed on the host) and fetching
every touched cold expert, played on the steps where the model proposes a split.

The step model (placement.tiering.split_cold, with the layer's calibration) predicts each split's
gain; what it cannot see is how the host math, the launches and the copies share the machine in
a step, and on one H200 the OLMoE splits it proposed ran 0.76-0.95x the tokens/s of fetching
everything (docs/benchmarks/tier.md) while Mixtral's ran 1.3-1.7x. So the worker keeps playing
both: each played step's measured length over the model's fetch-everything length of the same
step (the same yardstick for both arms, so the arms compare on equal terms whatever the rows),
and it plays the arm whose recent ratios have the lower median, trying the other now and then.

Pure: (state, observation) -> new state, (state, coin) -> decision; the coin (uniform in [0, 1),
the caller's generator) picks the arm while the trial learns and when it explores: a fixed
rotation would alias with the layers (16 layer steps a model step, each deciding in turn, would
give every layer the same arm). Medians of a short window, not means: a step that builds a kernel or a
oneDNN primitive runs several times its model and must not decide the trial on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class TrialConfig:
    window: int = 15  # ratios each arm's median is taken over (its latest)
    # per arm, before the medians decide (until then the arms are played at even odds): few, since
    # every step of the losing arm costs (on one H100, Mixtral's fetch-everything steps ran 1.8x
    # its splits) and a median of three already outvotes one odd step
    min_observed: int = 3
    warmup: int = 1  # first ratios of each arm not kept (the first shapes build kernels)
    explore_every: int = 32  # about one decision in this many plays the other arm
    explore_clear_every: int = 128  # ... where the other arm's median is over `clear` worse
    clear: float = 0.25
    hysteresis: float = 0.03  # the preferred arm changes where the other's median is this fraction lower

    def __post_init__(self) -> None:
        if not 1 <= self.min_observed <= self.window:
            raise ValueError(f"TrialConfig needs 1 <= min_observed <= window, got {self.min_observed}, {self.window}")
        if self.warmup < 0 or self.explore_every < 2 or self.explore_clear_every < self.explore_every:
            raise ValueError(f"TrialConfig: warmup {self.warmup} >= 0, explore_every {self.explore_every} >= 2 and "
                             f"explore_clear_every {self.explore_clear_every} >= explore_every are needed")
        if not (0 <= self.hysteresis < 1 and self.clear > 0):
            raise ValueError(f"TrialConfig: hysteresis {self.hysteresis} in [0, 1) and clear {self.clear} > 0 needed")


@dataclass(frozen=True)
class TrialState:
    split_ratios: tuple = ()  # latest kept ratios (measured / modelled fetch-everything) of split steps
    fetch_ratios: tuple = ()  # ... of steps that fetched everything where a split was proposed
    split_seen: int = 0  # observations of each arm, warm-up ones included
    fetch_seen: int = 0
    prefer_split: bool = True  # the model's choice until the medians say otherwise
    # the medians of the two windows, derived from them whenever a state is made (choose runs
    # between a layer's host sync and its launches, where the device waits: it reads them, it
    # does not sort)
    split_median: float | None = field(init=False, default=None)
    fetch_median: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        for name, ratios in (("split_median", self.split_ratios), ("fetch_median", self.fetch_ratios)):
            object.__setattr__(self, name, float(np.median(ratios)) if ratios else None)

    def median(self, split: bool) -> float | None:
        return self.split_median if split else self.fetch_median


def observe(state: TrialState, split: bool, ratio: float, config: TrialConfig = TrialConfig()) -> TrialState:
    """One played step's measured over modelled fetch-everything length (`split`: it left experts
    on the host). Non-finite or non-positive ratios are not evidence and change nothing."""
    if not (np.isfinite(ratio) and ratio > 0):
        return state
    seen = (state.split_seen if split else state.fetch_seen) + 1
    ratios = state.split_ratios if split else state.fetch_ratios
    if seen > config.warmup:
        ratios = (ratios + (float(ratio),))[-config.window:]
    if split:
        new = replace(state, split_seen=seen, split_ratios=ratios)
    else:
        new = replace(state, fetch_seen=seen, fetch_ratios=ratios)
    return _preference(new, config)


def _preference(state: TrialState, config: TrialConfig) -> TrialState:
    if learning(state, config):
        return state
    split_s, fetch_s = state.median(True), state.median(False)
    if state.prefer_split and fetch_s < (1 - config.hysteresis) * split_s:
        return replace(state, prefer_split=False)
    if not state.prefer_split and split_s < (1 - config.hysteresis) * fetch_s:
        return replace(state, prefer_split=True)
    return state


def learning(state: TrialState, config: TrialConfig = TrialConfig()) -> bool:
    """Either arm still has fewer than min_observed kept ratios (the arms are played at even odds)."""
    return min(len(state.split_ratios), len(state.fetch_ratios)) < config.min_observed


def choose(state: TrialState, coin: float, config: TrialConfig = TrialConfig()) -> bool:
    """Whether to play the proposed split at a step whose model proposes one; coin uniform in [0, 1)."""
    if learning(state, config):
        return coin < 0.5
    preferred, other = state.median(state.prefer_split), state.median(not state.prefer_split)
    every = config.explore_clear_every if other > (1 + config.clear) * preferred else config.explore_every
    return (not state.prefer_split) if coin < 1.0 / every else state.prefer_split

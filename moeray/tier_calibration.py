"""What a layer's host part really costs (issue 13), learnt from its steps: the rates a host tier
decides by are measured once, alone (moeray.tier_measure); in a step the host math runs beside
fetch copies, the launch thread and the machine's other threads, and starts only after the
rows' trip to the host (with the launches before it, measured on one H200 at 1-3 ms of an OLMoE
layer step, against ~0.3 ms a host expert). HostSlots observes each step that ran host math and splits by `rates(...)`.

What the rates cannot show is how the two parts share the machine inside a step: on one H200 an
OLMoE prefill layer step that left ~5 of ~32 touched experts on the host took 11.4 ms against
8.2 ms fetching all (measured at d400736; modelled shorter), because the host math, the launches
and the copies' CPU work take turns on one thread. So each layer also times its own steps
(`LayerSpan`: from its host sync to its last result, on the device's clock) and learns the
measured over the modelled length of the steps that left anything on the host and of those that
fetched everything; their quotient (`split_bias`) is what split_cold weighs host bets by.

The bias corrects the model; with `tier.split_trial` (off by default: no gain measured) whether
any host bet pays is measured outright (`SplitTrial`, one per worker, shared by its layers):
where a layer's model proposes a split, the trial plays it or fetches everything, and keeps to
whichever has run shorter against the model's fetch-everything length of the same step
(placement.split_trial).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from placement.split_trial import TrialConfig, TrialState, choose, learning, observe
from placement.tiering import TierRates


class HostCalibration:
    """The measured over the modelled time of the host math (TierRates.host_scale is multiplied by
    it) and the host part's start cost (added to TierRates.host_start_s, 0 as measured). Moving
    averages of clipped observations (a ratio within [lowest, highest], a start within
    [0, longest_start_s]), so one odd step (a page fault, a preemption) moves an average by at most
    `weight` x the clipped value. A step that leaves every touched slot to fetch observes nothing;
    `fade` then moves both a little toward the measured rates, so a slow spell of the host does not
    keep the split off the host for good."""

    def __init__(self, weight: float = 0.25, lowest: float = 0.25, highest: float = 16.0,
                 longest_start_s: float = 0.05, decay: float = 0.02, step_clip: float = 4.0, warmup_steps: int = 1):
        self.scale, self.start_s = 1.0, 0.0
        # measured over modelled layer step: steps that left anything on the host, steps that fetched all
        self.split_ratio, self.fetch_ratio = 1.0, 1.0
        self.split_steps, self.fetch_steps = 0, 0  # layer steps of each kind observed (warm-up ones too)
        self.weight, self.lowest, self.highest = weight, lowest, highest
        self.longest_start_s, self.decay = longest_start_s, decay
        # a whole step's ratio within [1 / step_clip, step_clip]: tighter than the host math's, since
        # the bias multiplies every host bet of the layer (a first step, compiling, runs many times its model)
        self.step_clip, self.warmup_steps = step_clip, warmup_steps
        self._learnt = None  # (scale, start_s, base rates) of the rates last handed out
        self._rates = None

    def observe(self, rates: TierRates, rows_X: np.ndarray, seconds: float, start_s: float = 0.0) -> None:
        modelled = float(rates.host_expert_seconds(rows_X).sum())
        if modelled > 0:
            ratio = min(max(seconds / modelled, self.lowest), self.highest)
            self.scale += self.weight * (ratio - self.scale)
            self.start_s += self.weight * (min(max(start_s, 0.0), self.longest_start_s) - self.start_s)

    def observe_step(self, measured_s: float, modelled_s: float, split: bool) -> None:
        """One layer step's measured length against the model's for the split it ran (split: it
        left anything on the host). The first `warmup_steps` of each kind are counted, not learnt:
        they build kernels and oneDNN primitives."""
        if not (modelled_s > 0 and np.isfinite(measured_s)):
            return
        ratio = min(max(measured_s / modelled_s, 1.0 / self.step_clip), self.step_clip)
        if split:
            self.split_steps += 1
            if self.split_steps > self.warmup_steps:
                self.split_ratio += self.weight * (ratio - self.split_ratio)
        else:
            self.fetch_steps += 1
            if self.fetch_steps > self.warmup_steps:
                self.fetch_ratio += self.weight * (ratio - self.fetch_ratio)

    @property
    def split_bias(self) -> float:
        """How much longer than modelled a step with host math runs, relative to a fetch-only one.
        Not gated on both kinds having been observed: fetch_ratio starts at the model's 1, so
        where splits run longer than modelled the bias turns them toward fetching everything,
        once it outweighs the split's modelled gain, and those steps then teach fetch_ratio; a
        layer whose splits always win keeps splitting (with a gate, such layers never learnt:
        docs/benchmarks/tier.md). split_ratio, unobserved, fades toward fetch_ratio (`fade`)."""
        return self.split_ratio / self.fetch_ratio

    def fade(self) -> None:
        """A step that computed nothing on the host although it touched host slots (the split's
        bias fades toward none, so a host that was slow for a while is tried again)."""
        self.scale += self.decay * (1.0 - self.scale)
        self.start_s -= self.decay * self.start_s
        self.split_ratio += self.decay * (self.fetch_ratio - self.split_ratio)

    def rates(self, rates: TierRates) -> TierRates:
        """`rates` with what was learnt (rebuilt only when the scale or the start moved by over 5%)."""
        last = self._learnt
        if last is None or last[2] is not rates or abs(self.scale / last[0] - 1) > 0.05 or \
                abs(self.start_s - last[1]) > 0.05 * max(last[1], 1e-4):
            self._learnt = (self.scale, self.start_s, rates)
            self._rates = replace(rates, host_scale=rates.host_scale * self.scale,
                                  host_start_s=rates.host_start_s + self.start_s)
        return self._rates


class SplitTrial:
    """A worker's trial of its host bets (placement.split_trial, with `tier.split_trial`), shared
    by its layers (one shape: 16 layers learn it 16 times as fast as one), one trial a bucket of
    the layer step's rows on this worker (an octave: decode's tens of rows and prefill's thousands
    favour different arms, measured: docs/benchmarks/tier.md). Steps run on one thread at a time
    (the worker's step lock), so no lock here."""

    def __init__(self, config: TrialConfig = TrialConfig(), seed: int = 0):
        self.config = config
        self.states: dict[int, TrialState] = {}  # rows bucket -> its trial
        self._rng = np.random.default_rng(seed)

    @staticmethod
    def bucket(rows: int) -> int:
        """The bucket of a layer step with this many rows on the worker: its octave."""
        return int(rows).bit_length()

    def play_split(self, bucket: int) -> bool:
        """Whether a step whose model proposes a split plays it (else it fetches everything)."""
        return choose(self.states.get(bucket, TrialState()), float(self._rng.random()), self.config)

    def observe(self, bucket: int, split: bool, measured_s: float, fetch_all_s: float) -> None:
        """A played step's measured length against the model's fetch-everything length of it."""
        if fetch_all_s > 0:
            self.states[bucket] = observe(self.states.get(bucket, TrialState()), split, measured_s / fetch_all_s,
                                          self.config)

    def view(self) -> dict:
        """Per bucket (rows up to 2^bucket - 1): what the trial learnt."""
        return {bucket: {"learning": learning(state, self.config), "prefer_split": state.prefer_split,
                         "split_median": state.median(True), "fetch_median": state.median(False),
                         "split_seen": state.split_seen, "fetch_seen": state.fetch_seen}
                for bucket, state in sorted(self.states.items())}


class LayerSpan:
    """The length of one layer step on one worker, from its host sync (where the device is idle:
    the sync waited for it) to its last result (the host results' join included). On a GPU two
    timing events on the main stream, read at the layer's next step, whose host sync has waited
    for the second one (no sync of its own); on a CPU worker the wall time, at once."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._began = None
        self._pending = None  # (begin event, end event, tag) of a GPU step not yet read

    def begin(self) -> None:
        if self.cuda:
            self._began = torch.cuda.Event(enable_timing=True)
            self._began.record(torch.cuda.current_stream(self.device))  # the layer's device, whichever is current
        else:
            self._began = time.perf_counter()

    def end(self, tag):
        """The step's end; returns (seconds, tag) of the last step whose length is known, or None."""
        if self._began is None:
            return None
        began, self._began = self._began, None
        if not self.cuda:
            return time.perf_counter() - began, tag
        ended = torch.cuda.Event(enable_timing=True)
        ended.record(torch.cuda.current_stream(self.device))
        done, self._pending = self.collect(), (began, ended, tag)
        return done

    def collect(self):
        """(seconds, tag) of the GPU step pending, if its end has passed (event query: no sync)."""
        if self._pending is None or not self._pending[1].query():
            return None
        began, ended, tag = self._pending
        self._pending = None
        return began.elapsed_time(ended) / 1e3, tag

"""What a layer's host part really costs (issue 13), learnt from its steps: the rates a host tier
decides by are measured once, alone (moeray.tier_measure); in a step the host math runs beside
fetch copies, the launch thread and the machine's other threads, and starts only after the
rows' trip to the host (with the launches before it, measured on one H200 at 1-3 ms of an OLMoE
layer step, against ~0.3 ms a host expert). HostSlots observes each step that ran host math and splits by `rates(...)`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

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
                 longest_start_s: float = 0.05, decay: float = 0.02):
        self.scale, self.start_s = 1.0, 0.0
        self.weight, self.lowest, self.highest = weight, lowest, highest
        self.longest_start_s, self.decay = longest_start_s, decay
        self._learnt = None  # (scale, start_s, base rates) of the rates last handed out
        self._rates = None

    def observe(self, rates: TierRates, rows_X: np.ndarray, seconds: float, start_s: float = 0.0) -> None:
        modelled = float(rates.host_expert_seconds(rows_X).sum())
        if modelled > 0:
            ratio = min(max(seconds / modelled, self.lowest), self.highest)
            self.scale += self.weight * (ratio - self.scale)
            self.start_s += self.weight * (min(max(start_s, 0.0), self.longest_start_s) - self.start_s)

    def fade(self) -> None:
        """A step that computed nothing on the host although it touched host slots."""
        self.scale += self.decay * (1.0 - self.scale)
        self.start_s -= self.decay * self.start_s

    def rates(self, rates: TierRates) -> TierRates:
        """`rates` with what was learnt (rebuilt only when the scale or the start moved by over 5%)."""
        last = self._learnt
        if last is None or last[2] is not rates or abs(self.scale / last[0] - 1) > 0.05 or \
                abs(self.start_s - last[1]) > 0.05 * max(last[1], 1e-4):
            self._learnt = (self.scale, self.start_s, rates)
            self._rates = replace(rates, host_scale=rates.host_scale * self.scale,
                                  host_start_s=rates.host_start_s + self.start_s)
        return self._rates

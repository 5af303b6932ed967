"""The coordinator's host-tier control (issue 13): which experts sit in each worker's device slots.
No Ray here; `CoordinatorCore` owns one and asks it at every decision.

Legend: L layers, E experts, S slots, S_w slots per worker.

A worker's local slots [0, budget) are in device memory, the rest in host memory, so moving an
expert between the tiers is a placement change inside one worker: a swap of two slots, carried
out by the same staged migration as any rebalance (staged while steps go on, committed at a step
boundary). Two ways in:
  - a rebalance plan from the planner (which knows nothing of tiers) is rearranged so every
    worker's hottest experts take its device slots, moving as few slots as it can;
  - between rebalances, `placement_tiers` swaps a host expert that out-carries a device one by
    the margin, after the cooldown, where the modelled step (rates measured on a worker) gains.
The step model is the cold path the workers run: with cold_path auto, where the workers' split
trials (moeray.tier_calibration.SplitTrial, tier.split_trial) have lately played few of the
splits their models proposed, their steps are fetch's and are modelled so (below 40% played;
back to auto above 60%: a learning trial plays about half, and must not flip the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from moeray.tier_config import HostTierConfig
from placement import Placement
from placement.migration import migration_between
from placement.planner import Plan
from placement.tiering import TierConfig, TierPlan, TierRates, arrange_tiers, placement_tiers


@dataclass
class TierControl:
    config: HostTierConfig
    slots_per_worker: int
    rates: TierRates | None = None  # measured by a worker (Worker.tier_rates); None: the margin alone decides
    rates_asked: bool = False
    last_change_s: float | None = None
    last: TierPlan | None = None  # the last live decision, for the stats view
    # worker rank -> its host-tier counts since this coordinator started (summed snapshot ranges)
    counts_by_worker: dict = field(default_factory=dict)
    # decayed counts of the splits the workers' models proposed and their trials played (each
    # snapshot's weighs by its proposals); played_share their quotient, None: none proposed yet
    proposed_decayed: float = 0.0
    played_decayed: float = 0.0
    fetch_modelled: bool = False  # auto modelled as fetch now (hysteresis between the two shares)
    KEEP = 0.7  # of the decayed counts at each snapshot
    FETCH_BELOW, AUTO_ABOVE = 0.4, 0.6

    @property
    def played_share(self) -> float | None:
        return self.played_decayed / self.proposed_decayed if self.proposed_decayed > 0 else None

    @property
    def budget(self) -> int:
        return self.config.device_slots_of(self.slots_per_worker)

    @property
    def active(self) -> bool:
        """A host tier exists (some slot of every worker is in host memory)."""
        return self.budget < self.slots_per_worker

    @property
    def live(self) -> bool:
        return self.config.live(self.slots_per_worker)

    @property
    def modelled_path(self) -> str:
        """The cold path the gain check models: the configured one, except auto whose workers'
        trials lately fetched everything at most proposed splits (their steps are fetch's)."""
        return "fetch" if self.config.cold_path == "auto" and self.fetch_modelled else self.config.cold_path

    def policy(self) -> TierConfig:
        c = self.config
        return TierConfig(budget=self.budget, margin=c.margin, max_swaps=c.max_swaps, cooldown_s=c.cooldown_s,
                          min_gain=c.min_gain, mode=self.modelled_path, host_margin=c.host_margin,
                          payback_steps=c.payback_steps)

    def arrange(self, plan: Plan, current: Placement, load_LE: np.ndarray, topology, now: float) -> Plan:
        """The planner's plan with every worker's hottest experts in its device slots (live
        tiering only; static keeps the planner's slots). The worker loads, hence the predicted
        imbalance, do not change; the migration is recomputed from `current`."""
        if not self.live:
            return plan
        arranged = arrange_tiers(plan.placement, load_LE, self.budget)
        if arranged is plan.placement:
            return plan
        self.last_change_s = now
        return replace(plan, placement=arranged, migration=migration_between(current, arranged, topology))

    def decide(self, current: Placement, load_LE: np.ndarray, steps: float, now: float) -> Placement | None:
        """The next placement with hot host experts swapped into device slots, or None."""
        if not self.live:
            return None
        self.last, self.last_change_s = placement_tiers(current, load_LE, steps, now, self.policy(),
                                                        self.last_change_s, self.rates)
        return self.last.placement

    def observe(self, worker: int, counts: dict) -> None:
        """Add one snapshot's host-tier counts of `worker` (its range's differences). Ranks are
        those of the epoch that sent them: after a scale a rank's totals go on with its new holder."""
        totals = self.counts_by_worker.setdefault(worker, dict.fromkeys(counts, 0))
        for name, value in counts.items():
            totals[name] = totals.get(name, 0) + value
        proposed = counts.get("proposed", 0)
        if proposed > 0:
            self.proposed_decayed = self.KEEP * self.proposed_decayed + proposed
            self.played_decayed = self.KEEP * self.played_decayed + proposed - counts.get("overruled", 0)
            share = self.played_share
            if share < self.FETCH_BELOW:
                self.fetch_modelled = True
            elif share > self.AUTO_ABOVE:
                self.fetch_modelled = False

    def view(self) -> dict:
        return {"device_slots": self.budget, "slots_per_worker": self.slots_per_worker,
                "cold_path": self.config.cold_path, "modelled_path": self.modelled_path,
                "played_share": self.played_share, "tiering": self.config.tiering,
                "rates": None if self.rates is None else vars(self.rates),
                "last": None if self.last is None else self.last.reason,
                "counts_by_worker": {rank: dict(totals) for rank, totals in sorted(self.counts_by_worker.items())}}

"""What a worker's host tier did (issue 13): per layer, the touched host slots computed on the host
or fetched to the device, their rows, the host math's time, prefetch use and the split trial's
overrulings; summed over a worker's layers for its statistics snapshots (moeray.worker_stats)
and the coordinator's tier metrics (moeray.metrics_tier)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from moeray.host_tier import HostSlots


@dataclass
class TierCounts:
    """What one layer's host slots did since the last reset (mutable, read by benches and reports)."""

    steps: int = 0
    host_experts: int = 0  # touched host slots computed on the host
    fetched_experts: int = 0  # touched host slots fetched to the device
    host_rows: int = 0
    fetched_rows: int = 0
    host_s: float = 0.0  # wall time of the host math

    prefetched: int = 0  # touched slots whose weights a prefetch had queued
    prefetch_unused: int = 0  # prefetched slots the step did not touch (a wasted copy)
    proposed: int = 0  # auto steps whose model proposed a split (leaving touched slots on the host)
    overruled: int = 0  # ... of them, those the split trial played as fetch-everything

    def add(self, rows_X: np.ndarray, host_slots: list[int], fetch_slots: list[int], prefetched=(),
            proposed: bool = False, overruled: bool = False) -> None:
        self.steps += 1
        self.proposed += int(proposed)
        self.overruled += int(overruled)
        self.prefetched += sum(1 for x in prefetched if rows_X[x])
        self.prefetch_unused += sum(1 for x in prefetched if not rows_X[x])
        self.host_experts += len(host_slots)
        self.fetched_experts += len(fetch_slots)
        self.host_rows += int(rows_X[host_slots].sum()) if host_slots else 0
        self.fetched_rows += int(rows_X[fetch_slots].sum()) if fetch_slots else 0


def tier_totals(hosts: list[HostSlots]) -> dict[str, float]:
    """A worker's host-tier counts (TierCounts' fields) summed over its layers since each layer's
    slots were built, and `copied_bytes`: expert weights its fetches copied to the device (unused
    prefetches included). What its statistics snapshots ship, as differences."""
    names = [f.name for f in fields(TierCounts)]
    totals = dict.fromkeys([*names, "copied_bytes"], 0)
    for host in hosts:
        for name in names:
            totals[name] += getattr(host.counts, name)
        totals["copied_bytes"] += (host.counts.fetched_experts + host.counts.prefetch_unused) * host.expert_bytes
    return totals

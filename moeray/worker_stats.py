"""A worker's routing statistics (a mixin of moeray.worker.Worker): its layers' on-device counters
read and shipped to the coordinator as `LoadSnapshot` differences, fire-and-forget, every few
steps; the host tier's counts ride along. Relies on the worker's `_step_lock`, `_slot_experts()`,
`steps`, `placement`, `runner`, `_cold_path`, `_commit_ms`, `coordinator` and `epoch`.

Legend: L MoE layers, E experts, S_w local slots.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from moeray.tier_counts import tier_totals
from moeray.stats_wire import LoadSnapshot


class StatsShipping:
    def set_stats_recording(self, enabled: bool) -> None:
        """Count routed pairs and ship snapshots (True), or skip both (False; for A/B overhead runs)."""
        with self._step_lock:
            if enabled and not self.stats_recording:
                # Counting resumes from here: the pause must not look like a burst of traffic.
                self._mark_shipped()
            self.stats_recording = enabled
            for experts in self._slot_experts():
                experts.record_load = enabled
            if hasattr(self, "runner"):
                self.runner.invalidate_graphs()

    def _read_counters(self) -> tuple[np.ndarray, np.ndarray]:
        experts = self._slot_experts()
        return (torch.stack([e.load_E for e in experts]).cpu().numpy(),
                torch.stack([e.rows_S for e in experts]).cpu().numpy())

    def _tier_totals(self) -> dict | None:
        """The host tier's counts since its layers were built (None: no host tier)."""
        if self._cold_path is None:
            return None
        return tier_totals([e.host for e in self._slot_experts() if e.host is not None])

    def _mark_shipped(self, counters: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """The next snapshot counts from this step and these counters (default: read now)."""
        self._shipped_load_LE, self._shipped_rows_LS = self._read_counters() if counters is None else counters
        self._shipped_tier = self._tier_totals()
        self._shipped_step = self.steps

    def attach_coordinator(self, coordinator, epoch: int) -> None:
        # One blocking call opens this worker's connection to the coordinator: without it, the
        # first reports queue here until the connection forms and then arrive in a burst.
        ray.get(coordinator.ping.remote(), timeout=60)
        self.coordinator = coordinator
        self.epoch = epoch

    def _ship_snapshot(self) -> None:
        """Send the counts since the last snapshot to the coordinator, fire-and-forget.

        host sync: one device-to-host copy of the [L, E] and [L, S_w] counters every N steps.
        """
        if self.steps == self._shipped_step or not self.stats_recording:
            return None
        load_LE, rows_LS = self._read_counters()
        tier, shipped = self._tier_totals(), self._shipped_tier
        snapshot = LoadSnapshot(self.rank, self.epoch, self._shipped_step, self.steps, self.placement.version,
                                load_LE - self._shipped_load_LE, rows_LS - self._shipped_rows_LS, self._commit_ms,
                                None if tier is None else {k: v - shipped[k] for k, v in tier.items()})
        ref = self.coordinator.report.remote(snapshot.encode())  # not awaited: never on the hot path
        self._mark_shipped((load_LE, rows_LS))
        self._commit_ms = None
        return ref

    def flush_stats(self) -> list:
        """Ship the counts not yet shipped; returns [ref] of the report (empty if nothing was due),
        boxed so the caller can wait for the coordinator to ingest it."""
        with self._step_lock:
            ref = self._ship_snapshot() if self.coordinator is not None else None
        return [] if ref is None else [ref]

    def load_counts(self) -> np.ndarray:
        """[L, E] pairs routed by this worker's tokens since start-up (one host sync). The counters
        are never reset: snapshots ship differences against them. Under the step lock: a CUDA call
        from another actor thread during a graph capture would invalidate the capture."""
        with self._step_lock:
            return self._read_counters()[0]

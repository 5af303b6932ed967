"""The coordinator actor: routing snapshots in, placements out, migrations driven.

A thin async Ray actor around `CoordinatorCore` (all decisions live there and are unit-tested
without a cluster). Async so that snapshot reports keep arriving while a migration's transfers
are awaited.

Migration (prepare phase): for placement v+1 every source worker exports the slots it gives
(host copies of version v), every worker stages what it gains for v+1 (fetching through the
object store) on a spare actor thread while steps continue. When all have staged, `tick` returns
and the engine commits v+1 at its next step boundary.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import numpy as np

from moeray.coordinator_core import CoordinatorCore
from moeray.slot_transfer import lower_process_priority
from moeray.stats_wire import LoadSnapshot
from placement import Placement, Topology
from placement.fault_aware import FaultAwareOptions
from placement.planner import Plan
from placement.policy import PolicyConfig


class Coordinator:
    def __init__(self, phy2log_LS: np.ndarray, version: int, num_experts: int, slots_per_worker: int,
                 bytes_per_expert: int, rebalance: dict, workers: list, epoch: int, timeout_s: float,
                 device: str = "cpu", replica_weights_LS: np.ndarray | None = None, restored: dict | None = None):
        """`restored`: what the engine kept when the previous coordinator died (CoordinatorCore.restore)."""
        placement = Placement(phy2log_LS, num_experts, slots_per_worker, version)
        self.core = CoordinatorCore(
            placement=placement,
            topology=Topology.flat(placement.num_workers, slots_per_worker),
            bytes_per_expert=bytes_per_expert,
            window_steps=rebalance["window_steps"],
            policy_config=PolicyConfig(
                min_gain=rebalance["min_gain"], cooldown_s=rebalance["cooldown_s"],
                min_tokens=rebalance["min_tokens"], confirmations=rebalance["confirmations"]),
            epoch=epoch,
            drift_threshold=rebalance["drift_threshold"],
            replica_weights_LS=replica_weights_LS,  # a coordinator restarted by Engine.recover
            fault_aware=FaultAwareOptions() if rebalance.get("fault_aware") else None,
        )
        if restored is not None:
            self.core.restore(**restored)
        self.workers = workers
        self.timeout_s = timeout_s
        # Control plane: planning and snapshot handling yield the CPU to the workers' steps.
        lower_process_priority()
        self.device = device  # "cuda": slots move by NCCL p2p (Worker.stage_p2p), not the object store
        self.reports = 0

    def ping(self) -> int:
        return self.reports

    async def report(self, payload: bytes) -> None:
        self.reports += 1
        self.core.ingest(LoadSnapshot.decode(payload))

    async def tick(self, now: float | None = None, force: bool = False) -> dict | None:
        """Policy check; on a rebalance, plan and stage v+1 on every worker. Returns the staged
        placement for the engine to commit, or None."""
        new_plan = self.core.maybe_plan(time.time() if now is None else now, force=force)
        if new_plan is None:
            return None
        version = new_plan.placement.version
        try:
            transfer_ms = await self._prepare(new_plan)
        except Exception as exc:
            self.core.abandoned(version, f"{type(exc).__name__}: {exc}")
            raise
        self.core.staged(version, transfer_ms)
        return {"version": version, "phy2log": new_plan.placement.phy2log, "replica_weights": new_plan.replica_weights}

    async def _prepare(self, new_plan: Plan) -> float:
        start = time.perf_counter()
        spw = new_plan.placement.slots_per_worker
        mig = new_plan.migration
        if self.device == "cuda":
            # Every worker gets the same global list (p2p chunks must line up across ranks).
            copies = [(layer, src // spw, src % spw, dst // spw, dst % spw)
                      for layer, dst, src in zip(mig.layer.tolist(), mig.dst_slot.tolist(), mig.src_slot.tolist())]
            refs = [w.stage_p2p.remote(new_plan.placement.version, new_plan.placement.phy2log,
                                       new_plan.replica_weights, copies) for w in self.workers]
            await asyncio.wait_for(asyncio.gather(*refs), timeout=self.timeout_s)
            return 1e3 * (time.perf_counter() - start)
        exports: dict[int, list[tuple[int, int]]] = defaultdict(list)  # src worker -> [(layer, local slot)]
        gains: dict[int, list[tuple[tuple[int, int], int, int]]] = defaultdict(list)  # dst -> [((l, slot), src, idx)]
        for layer, dst, src in zip(mig.layer.tolist(), mig.dst_slot.tolist(), mig.src_slot.tolist()):
            src_worker = src // spw
            exports[src_worker].append((layer, src % spw))
            gains[dst // spw].append(((layer, dst % spw), src_worker, len(exports[src_worker]) - 1))
        export_refs = {w: self.workers[w].export_slots.remote(entries) for w, entries in exports.items()}
        stage_refs = []
        for rank, worker in enumerate(self.workers):
            entries = [e for e, _, _ in gains[rank]]
            sources = [([export_refs[src]], idx) for _, src, idx in gains[rank]]
            stage_refs.append(worker.stage.remote(
                new_plan.placement.version, new_plan.placement.phy2log, new_plan.replica_weights, entries, sources))
        await asyncio.wait_for(asyncio.gather(*stage_refs), timeout=self.timeout_s)
        return 1e3 * (time.perf_counter() - start)

    def resync(self, phy2log_LS: np.ndarray, version: int, replica_weights_LS, workers: list, epoch: int,
               step: int, slots_per_worker: int | None = None) -> None:
        """After Engine.recover: the new group's workers and the engine's committed placement
        (see CoordinatorCore.resync). Idempotent, so a retried recovery can send it again."""
        self.workers = workers
        spw = self.core.placement.slots_per_worker if slots_per_worker is None else slots_per_worker
        placement = Placement(phy2log_LS, self.core.placement.num_experts, spw, version)
        self.core.resync(placement, replica_weights_LS, epoch, step)

    def reserve_version(self) -> int:
        return self.core.reserve_version()

    def resize(self, phy2log_LS: np.ndarray, version: int, slots_per_worker: int, replica_weights_LS, workers: list,
               epoch: int) -> None:
        """After Engine.scale: the new group's workers, placement and worker count."""
        self.workers = workers
        placement = Placement(phy2log_LS, self.core.placement.num_experts, slots_per_worker, version)
        self.core.resize(placement, replica_weights_LS, epoch)

    def committed(self, version: int, step: int) -> None:
        self.core.committed(version, step)

    def records(self) -> list[dict]:
        """The rebalance log (the engine keeps a copy that outlives this actor)."""
        return [r.as_dict() for r in self.core.records]

    def view(self, timeline: bool = True) -> dict:
        """Compact view for metrics and the placement report (CoordinatorCore.view)."""
        return self.core.view(timeline)

    def summary(self) -> dict:
        out = self.core.summary()
        out["reports"] = self.reports
        return out

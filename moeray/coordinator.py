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

from moeray.config import EngineConfig
from moeray.coordinator_core import CoordinatorCore
from moeray.planning import PlanningSetup
from moeray.slot_transfer import lower_process_priority
from moeray.stats_wire import LoadSnapshot
from moeray.tier_control import TierControl
from placement import Placement
from placement.fault_aware import FaultAwareOptions
from placement.planner import Plan
from placement.policy import PolicyConfig


class Coordinator:
    def __init__(self, placement: Placement, config: EngineConfig, workers: list, epoch: int,
                 node_ids: list | None = None, restored: dict | None = None):
        """`placement`: the engine's committed one (split weights included: a coordinator restarted
        by Engine.recover starts on them). `node_ids`: the node of each worker rank at the engine's
        start (the topology when parallel.workers_per_node is None). `restored`: what the engine
        kept when the previous coordinator died (CoordinatorCore.restore)."""
        rebalance = config.rebalance
        self.core = CoordinatorCore(
            placement=placement,
            bytes_per_expert=config.model.expert_bytes,
            window_steps=rebalance.window_steps,
            policy_config=PolicyConfig(
                min_gain=rebalance.min_gain, cooldown_s=rebalance.cooldown_s,
                min_tokens=rebalance.min_tokens, confirmations=rebalance.confirmations),
            epoch=epoch,
            drift_threshold=rebalance.drift_threshold,
            fault_aware=FaultAwareOptions() if rebalance.fault_aware else None,
            planning=PlanningSetup.from_config(config),
            node_ids=None if node_ids is None else tuple(node_ids),
            tiers=TierControl(config.tier, config.slots_per_worker) if config.tier.enabled else None,
            rebalance_enabled=rebalance.enabled,
        )
        if restored is not None:
            self.core.restore(**restored)
        self.workers = workers
        self.timeout_s = config.parallel.collective_timeout_s
        # Control plane: planning and snapshot handling yield the CPU to the workers' steps.
        lower_process_priority()
        self.device = config.parallel.device  # "cuda": slots move by NCCL p2p (Worker.stage_p2p), not the object store
        self.reports = 0

    def ping(self) -> int:
        return self.reports

    async def report(self, payload: bytes) -> None:
        self.reports += 1
        self.core.ingest(LoadSnapshot.decode(payload))

    async def tick(self, now: float | None = None, force: bool = False, requested: Placement | None = None) -> dict | None:
        """Policy check; on a rebalance, plan and stage v+1 on every worker. Returns the staged
        placement for the engine to commit ({"version", "placement"}: the plan's Placement as the
        planner made it, split weights and shard widths included), or None."""
        tiers = self.core.tiers
        if tiers is not None and tiers.live and not tiers.rates_asked and self.device == "cuda":
            # the measured rates the tier swaps are modelled with (one worker's: the workers are alike).
            # CPU workers: no model; "device" and host slots share one memory and CPU, the margin decides
            tiers.rates_asked = True
            tiers.rates = await asyncio.wait_for(self.workers[0].tier_rates.remote(), timeout=self.timeout_s)
        new_plan = self.core.maybe_plan(time.time() if now is None else now, force=force, requested=requested)
        if new_plan is None:
            return None
        version = new_plan.placement.version
        try:
            transfer_ms = await self._prepare(new_plan)
        except Exception as exc:
            self.core.abandoned(version, f"{type(exc).__name__}: {exc}")
            raise
        self.core.staged(version, transfer_ms)
        return {"version": version, "placement": new_plan.placement}

    async def _prepare(self, new_plan: Plan) -> float:
        start = time.perf_counter()
        spw = new_plan.placement.slots_per_worker
        mig = new_plan.migration
        # each copy: columns [c0, c1) (fractions of F; (0, 1) whole) of old slot src into new slot dst
        entries = mig.column_copies()
        if self.device == "cuda":
            # Every worker gets the same global list (p2p chunks must line up across ranks).
            copies = [(layer, src // spw, src % spw, dst // spw, dst % spw, c0, c1) for layer, dst, src, c0, c1 in entries]
            refs = [w.stage_p2p.remote(new_plan.placement, copies) for w in self.workers]
            await asyncio.wait_for(asyncio.gather(*refs), timeout=self.timeout_s)
            return 1e3 * (time.perf_counter() - start)
        exports: dict[int, list[tuple[int, int]]] = defaultdict(list)  # src worker -> [(layer, local slot)]
        gains: dict[int, list[tuple[tuple, int, int]]] = defaultdict(list)  # dst -> [((l, slot, src, c0, c1), src worker, idx)]
        exported: dict[tuple[int, int, int], int] = {}  # (src worker, layer, local slot) -> index in its export
        for layer, dst, src, c0, c1 in entries:
            src_worker = src // spw
            key = (src_worker, layer, src % spw)
            if key not in exported:  # a slot that feeds several copies is exported once
                exported[key] = len(exports[src_worker])
                exports[src_worker].append((layer, src % spw))
            gains[dst // spw].append(((layer, dst % spw, src, c0, c1), src_worker, exported[key]))
        export_refs = {w: self.workers[w].export_slots.remote(entries) for w, entries in exports.items()}
        stage_refs = []
        for rank, worker in enumerate(self.workers):
            entries = [e for e, _, _ in gains[rank]]
            sources = [([export_refs[src]], idx) for _, src, idx in gains[rank]]
            stage_refs.append(worker.stage.remote(new_plan.placement, entries, sources))
        await asyncio.wait_for(asyncio.gather(*stage_refs), timeout=self.timeout_s)
        return 1e3 * (time.perf_counter() - start)

    def resync(self, placement: Placement, workers: list, epoch: int, step: int) -> None:
        """After Engine.recover: the new group's workers and the engine's committed placement
        (see CoordinatorCore.resync). Idempotent, so a retried recovery can send it again."""
        self.workers = workers
        self.core.resync(placement, epoch, step)

    def reserve_version(self) -> int:
        return self.core.reserve_version()

    def resize(self, placement: Placement, workers: list, epoch: int) -> None:
        """After Engine.scale: the new group's workers, placement and worker count."""
        self.workers = workers
        self.core.resize(placement, epoch)

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

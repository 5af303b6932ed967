"""The coordinator's logic: snapshots in, rebalance plans and a log out. No Ray here, so it is
unit-tested without a cluster; `moeray/coordinator.py` wraps it in an actor.

Legend: L layers, E experts, S slots, W workers, S_w slots per worker.

Snapshots from all W workers for the same step range are summed, then pushed into a sliding
`placement.stats.LoadWindow` (what `stats()` reports) and an exponentially decayed load with a
half-life of a quarter window (what the policy and planner see). When a range's expert distribution moves away from that
estimate by more than `drift_threshold` (total variation), the estimate restarts from the range:
a re-plan after a drift then sees only the new traffic instead of waiting for the old to decay. Workers run in lockstep and flush at the same steps (every N steps
and at each commit), so their ranges line up exactly and a range never mixes placement versions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from placement.fault_aware import FaultAwareOptions
from placement import Placement, Topology
from placement.metrics import imbalance, imbalance_of_worker_loads, worker_loads
from placement.planner import Plan
from placement.policy import Decision, PolicyConfig, PolicyState, PolicyStats, decide, decision_metric
from placement.stats import DecayedLoad, LoadWindow, load_shift

from moeray.coordinator_timeline import rows_around_last_commit, step_timeline, sum_rows
from moeray.rebalance_log import RebalanceRecord
from moeray.planning import PlannerChoice, PlanningSetup, requested_plan, same_placement
from moeray.stats_wire import LoadSnapshot
from moeray.tier_control import TierControl

_HISTORY_LIMIT = 4096  # step ranges kept for stats(); older ones are dropped


@dataclass
class CoordinatorCore:
    """`placement` is the committed one (split weights and shard widths included). The topology is
    built from `planning` (nodes x workers per node: configured, else from `node_ids`, the node of
    each worker at start-up) unless one is given, and rebuilt at every resync / resize."""

    placement: Placement
    bytes_per_expert: int
    window_steps: int
    policy_config: PolicyConfig
    topology: Topology | None = None  # None: from `planning` and `node_ids`
    drift_threshold: float = 0.2  # load_shift above which the decayed estimate restarts
    epoch: int = 0
    fault_aware: FaultAwareOptions | None = None  # the planner's fault-aware pass (None: off)
    planning: PlanningSetup = field(default_factory=PlanningSetup)  # which planner, link rates, model shape
    node_ids: tuple | None = None  # node id of each worker rank at start-up (workers_per_node=None)
    tiers: TierControl | None = None  # the host tier's device slots (moeray.tier_control); None: no host tier
    rebalance_enabled: bool = True  # False: only forced or requested plans, and tier swaps
    workers_per_node: int | None = field(init=False, default=None)  # kept across resizes; None: flat
    topology_reason: str = field(init=False, default="")  # which topology and why (the stats view shows it)
    last_choice: PlannerChoice | None = None  # the planner of the last plan, and why
    window: LoadWindow = field(init=False)
    recent: DecayedLoad = field(init=False)
    policy_state: PolicyState = field(default_factory=PolicyState)
    records: list[RebalanceRecord] = field(default_factory=list)
    pending: dict = field(default_factory=dict)       # (step_lo, step_hi) -> {worker: snapshot}
    realised_rows: dict = field(default_factory=dict)  # version -> (rows_LW sum, steps)
    history: list = field(default_factory=list)      # per completed range: (step_lo, step_hi, version, rows_LW)
    drifts_detected: list = field(default_factory=list)  # first step of each range that restarted the estimate
    last_decision: Decision | None = None
    in_flight: Plan | None = None
    # Versions are never reused: a migration abandoned after a failure may still land late on a
    # worker (its stage call was not cancelled); a later plan with the same number would be
    # indistinguishable from it. Workers refuse stages that are not newer than what they hold.
    highest_version: int = -1

    def __post_init__(self) -> None:
        self.highest_version = max(self.highest_version, self.placement.version)
        self.workers_per_node, self._per_node_reason = self.planning.workers_per_node_for(self.node_ids)
        if self.topology is None:
            self._build_topology()
        else:
            self.topology_reason = "given to the coordinator"
        self.window = LoadWindow(self.window_steps)
        self.recent = DecayedLoad(max(self.window_steps / 4, 1.0))

    # ---- statistics ----------------------------------------------------------------------------
    def ingest(self, snapshot: LoadSnapshot) -> bool:
        """Add one worker's snapshot; returns True when it completed a step range."""
        if snapshot.epoch != self.epoch:
            return False  # a snapshot from a group that no longer exists
        if snapshot.tier is not None and self.tiers is not None:
            self.tiers.observe(snapshot.worker, snapshot.tier)  # every range counts, complete or not
        key = (snapshot.step_lo, snapshot.step_hi)
        by_worker = self.pending.setdefault(key, {})
        by_worker[snapshot.worker] = snapshot
        if len(by_worker) < self.topology.num_workers:
            return False
        del self.pending[key]
        # Workers ship their ranges in step order, so a range that ended before this one began can
        # never complete (a worker resumed counting at another step: a stats toggle); drop it.
        for stale in [k for k in self.pending if k[1] <= snapshot.step_lo]:
            del self.pending[stale]
        snaps = list(by_worker.values())
        steps = snapshot.step_hi - snapshot.step_lo
        counts_LE = np.sum([s.counts_LE for s in snaps], axis=0)
        self.window = self.window.update(counts_LE, steps=steps)
        if self.recent.load is not None and load_shift(counts_LE, self.recent.load_LE) > self.drift_threshold:
            # A drift: the old traffic says nothing about the new, so the estimate restarts from
            # this range instead of waiting for the old load to decay away.
            self.recent = DecayedLoad(self.recent.half_life_steps)
            self.drifts_detected.append(snapshot.step_lo)
        self.recent = self.recent.update(counts_LE, steps=steps)
        self._record_realised(snaps, steps)
        return True

    def _slot_widths(self, version: int) -> np.ndarray | None:
        """[L, W, S_w] slot widths of a sharded placement `version` (live or in flight); None otherwise."""
        known = [self.placement] + ([self.in_flight.placement] if self.in_flight is not None else [])
        for placement in known:
            if placement.version == version and placement.is_sharded:
                return placement.width_LS.reshape(placement.num_layers, placement.num_workers, placement.slots_per_worker)
        return None

    def _record_realised(self, snaps: list[LoadSnapshot], steps: int) -> None:
        version = snaps[0].version
        # compute per worker: rows x the slot's share of F (a shard of width w does w of a row's work)
        width_LWS = self._slot_widths(version)
        rows_LW = np.stack([(s.rows_LS if width_LWS is None else s.rows_LS * width_LWS[:, s.worker]).sum(axis=1)
                            for s in sorted(snaps, key=lambda s: s.worker)], axis=1)
        self.history.append((snaps[0].step_lo, snaps[0].step_hi, version, rows_LW))
        del self.history[:-_HISTORY_LIMIT]
        total, seen = self.realised_rows.get(version, (np.zeros_like(rows_LW), 0))
        if seen >= self.window_steps:
            return  # the realised figure of a version covers its first window only
        self.realised_rows[version] = (total + rows_LW, seen + steps)
        commit_ms = [s.commit_ms for s in snaps if s.commit_ms is not None]
        for record in self.records:
            if record.version == version:
                per_layer = imbalance_of_worker_loads(self.realised_rows[version][0].astype(np.float64))
                record.realised_after = float(per_layer.mean())
                record.realised_after_worst = float(per_layer.max())
                record.realised_steps = self.realised_rows[version][1]
                if commit_ms:
                    record.stall_ms = max(record.stall_ms or 0.0, *commit_ms)

    def _build_topology(self) -> None:
        """nodes x workers_per_node for the placement's worker count (flat with the reason when
        it is no multiple)."""
        p = self.placement
        self.topology, reason = self.planning.topology(p.num_workers, p.slots_per_worker, self.workers_per_node)
        self.topology_reason = f"{reason} ({self._per_node_reason})"
        if self.tiers is not None:
            self.tiers.slots_per_worker = p.slots_per_worker

    @property
    def replica_weights_LS(self) -> np.ndarray | None:
        """[L, S] split weights of the committed placement (None: equal split)."""
        return self.placement.replica_weights

    @property
    def load_LE(self) -> np.ndarray:
        """[L, E] routed pairs over the window (zeros before the first complete step range)."""
        if not self.window.chunks:
            return np.zeros((self.placement.num_layers, self.placement.num_experts), dtype=np.int64)
        return self.window.load_LE

    @property
    def planning_load_LE(self) -> np.ndarray:
        """[L, E] recency-weighted load the policy and planner act on."""
        if self.recent.load is None:
            return np.zeros((self.placement.num_layers, self.placement.num_experts))
        return self.recent.load_LE

    def current_imbalance(self, load_LE: np.ndarray | None = None) -> np.ndarray:
        """[L] imbalance the current placement gives `load_LE` (default: the windowed load)."""
        return imbalance(self.load_LE if load_LE is None else load_LE, self.placement)

    # ---- decisions -----------------------------------------------------------------------------
    def maybe_plan(self, now: float, force: bool = False, requested: Placement | None = None) -> Plan | None:
        """Ask the policy (or skip it when forced); return the plan for version + 1, or None.
        `requested`: this placement instead of the planner's (no policy check)."""
        if self.in_flight is not None:
            self.last_decision = Decision(False, f"migration to v{self.in_flight.placement.version} in flight")
            return None
        load_LE = self.planning_load_LE
        if requested is not None:
            self.last_decision = Decision(True, "requested placement")
            self.last_choice = PlannerChoice("requested", "placement given by the caller")
            return self._begin(requested_plan(self.placement, requested, self.topology, load_LE), now,
                               self.last_decision, self.current_imbalance(load_LE))
        tokens = float(self.load_LE.sum())
        if tokens == 0:
            self.last_decision = Decision(False, "no load observed yet")
            return None
        cache: dict[str, Plan] = {}

        def planned() -> Plan:
            if "plan" not in cache:
                top_k = self.planning.shape.top_k if self.planning.shape is not None else 1
                tokens = float(self.load_LE.sum(axis=1).mean()) / top_k / max(self.window.steps, 1)  # per step
                cache["plan"], self.last_choice = self.planning.plan(
                    load_LE, self.topology, self.placement, self.bytes_per_expert, tokens, self.fault_aware)
            return cache["plan"]

        current = self.current_imbalance(load_LE)
        if not force and not self.rebalance_enabled:
            self.last_decision = Decision(False, "rebalance policy off")
            return self._tier_plan(now, load_LE, current)
        if force:
            decision = Decision(True, "forced")
            self.policy_state = PolicyState(last_rebalance_s=now)
        else:
            # The policy compares one number: the average of the mean and the worst layer, so one
            # badly balanced layer triggers a re-plan (often a weights-only one that moves no bytes).
            stats = PolicyStats(decision_metric(current), lambda: decision_metric(planned().predicted_imbalance_LAYERS), tokens)
            decision, self.policy_state = decide(self.policy_state, stats, now, self.policy_config)
        self.last_decision = decision
        if not decision.rebalance:
            return self._tier_plan(now, load_LE, current)
        new_plan = planned()
        if same_placement(new_plan.placement, self.placement) and not force:
            self.last_decision = Decision(False, "planner kept every slot and split weight", decision.gain)
            return self._tier_plan(now, load_LE, current)
        if self.tiers is not None:  # the planner knows nothing of tiers: hottest experts into device slots
            new_plan = self.tiers.arrange(new_plan, self.placement, load_LE, self.topology, now)
        # Zero slot copies with new split weights is still a rebalance: it moves no bytes.
        return self._begin(new_plan, now, decision, current)

    def _tier_plan(self, now: float, load_LE: np.ndarray, current: np.ndarray) -> Plan | None:
        """No rebalance: swaps between each worker's device and host slots (TierControl.decide), or None."""
        tiered = None if self.tiers is None else self.tiers.decide(self.placement, load_LE, self.recent.effective_steps, now)
        if tiered is None:
            if self.tiers is not None and self.tiers.last is not None:
                self.last_decision = replace(self.last_decision, reason=f"{self.last_decision.reason}; {self.tiers.last.reason}")
            return None
        self.last_decision = Decision(True, self.tiers.last.reason)
        self.last_choice = PlannerChoice("tiering", self.tiers.last.reason)
        return self._begin(requested_plan(self.placement, tiered, self.topology, load_LE), now, self.last_decision, current)

    def _begin(self, new_plan: Plan, now: float, decision: Decision, current: np.ndarray) -> Plan:
        """Number the plan (versions are never reused), put it in flight and log it."""
        self.highest_version += 1
        if new_plan.placement.version != self.highest_version:
            new_plan = replace(new_plan, placement=replace(new_plan.placement, version=self.highest_version))
        self.in_flight = new_plan
        self.records.append(RebalanceRecord(
            version=new_plan.placement.version, started_at=now, reason=decision.reason,
            predicted_before=float(current.mean()),
            predicted_after=float(new_plan.predicted_imbalance_LAYERS.mean()),
            predicted_after_worst=float(new_plan.predicted_imbalance_LAYERS.max()),
            slots_moved=new_plan.migration.num_copies,
            bytes_moved=new_plan.migration.bytes_moved(self.bytes_per_expert),
            planning_ms=float(new_plan.planning_ms),
            planner=self.last_choice.planner, planner_reason=self.last_choice.reason,
        ))
        return new_plan

    def staged(self, version: int, transfer_ms: float) -> None:
        for record in self.records:
            if record.version == version:
                record.transfer_ms = transfer_ms

    def committed(self, version: int, step: int) -> None:
        """The engine switched every worker to `version` at `step`."""
        if self.in_flight is None or self.in_flight.placement.version != version:
            raise ValueError(f"commit of v{version} but v{self.in_flight.placement.version if self.in_flight else None} is in flight")
        self.placement = self.in_flight.placement
        if self.placement.slots_per_worker != self.topology.slots_per_worker:
            self._build_topology()  # a layout plan padded every worker's slots
        self.in_flight = None
        for record in self.records:
            if record.version == version:
                record.committed_at_step = step

    def abandoned(self, version: int, reason: str) -> None:
        """A migration failed before commit: serving stays on the current version."""
        if self.in_flight is not None and self.in_flight.placement.version == version:
            self.in_flight = None
        self.records = [r if r.version != version else replace(r, reason=f"{r.reason}; abandoned: {reason}")
                        for r in self.records]

    def resync(self, placement: Placement, epoch: int, step: int) -> None:
        """After Engine.recover: the engine's committed placement is the truth. A migration in
        flight either is that placement (the failed step was committing it) or is abandoned."""
        if self.in_flight is not None:
            if self.in_flight.placement.version == placement.version:
                self.committed(placement.version, step)
            else:
                self.abandoned(self.in_flight.placement.version, "a worker was lost before the commit")
        if (placement.num_workers, placement.slots_per_worker) != (self.topology.num_workers,
                                                                   self.topology.slots_per_worker):
            # a scale that failed part-way was recovered at another count: rows per worker restart
            self.history.clear()
            self.realised_rows.clear()
        self.placement = placement
        self._build_topology()
        self.highest_version = max(self.highest_version, placement.version)
        self.epoch = epoch
        self.pending.clear()  # half-collected ranges of the old epoch would never complete

    def restore(self, highest_version: int, records: list[dict], load_LE: np.ndarray | None) -> None:
        """A coordinator rebuilt after the previous one died (Engine.restart_coordinator): versions
        continue above every one any worker ran or staged, the rebalance log the engine kept goes
        on, and the load the workers counted since start-up stands in for one window until new
        ranges replace it (the drift check restarts the estimate if traffic moved since)."""
        self.highest_version = max(self.highest_version, int(highest_version))
        known = {f for f in RebalanceRecord.__dataclass_fields__}
        self.records = [RebalanceRecord(**{k: v for k, v in r.items() if k in known}) for r in records]
        if load_LE is not None and np.asarray(load_LE).sum() > 0:
            self.window = self.window.update(load_LE, steps=self.window_steps)
            self.recent = self.recent.update(load_LE, steps=self.window_steps)

    def reserve_version(self) -> int:
        """A placement version never used before (Engine.scale numbers its placement with it)."""
        self.highest_version += 1
        return self.highest_version

    def resize(self, placement: Placement, epoch: int) -> None:
        """Engine.scale: a new worker count and placement. A migration in flight is abandoned (it
        was planned for the old workers); the per-worker history restarts (rows of different worker
        counts do not add up); the expert load window and the rebalance log stay."""
        if self.in_flight is not None:
            self.abandoned(self.in_flight.placement.version, "the worker count changed")
        self.placement = placement
        self._build_topology()  # the same workers per node (flat when the new count is no multiple)
        self.highest_version = max(self.highest_version, placement.version)
        self.epoch = epoch
        self.pending.clear()
        self.history.clear()
        self.realised_rows.clear()
        if self.tiers is not None:
            self.tiers.rates_asked = False  # the workers measured them again for the new count

    def view(self, timeline: bool = True) -> dict:
        """What metrics, `GET /v1/placement` and `moeray plot` show, compact: no per-range rows
        (a metrics scrape must not ship [ranges, L, W] arrays, up to _HISTORY_LIMIT of them).

        `realised_imbalance_per_layer` is max/mean of the rows each worker actually computed over
        the last `window_steps` steps (None before a range completed); `imbalance_per_layer` is the
        current placement applied to the windowed load. With `timeline`: one point per completed
        step range (realised imbalance of the range and of the window ending with it, mean and
        worst layer) and the realised rows per worker before and after the last committed rebalance.
        """
        ranges = sorted(self.history, key=lambda h: h[0])  # ranges complete out of order across workers
        load_LE = self.load_LE
        p = self.placement
        realised_LW, _ = sum_rows(reversed(ranges), self.window_steps)
        out = {
            "placement_version": p.version,
            "epoch": self.epoch,
            "window_steps": self.window.steps,
            "load_LE": load_LE,
            "worker_load_LW": worker_loads(load_LE, p.phy2log, p.slots_per_worker, p.replica_weights, p.shard_width),
            "imbalance_per_layer": self.current_imbalance(load_LE) if load_LE.sum() else np.ones(p.num_layers),
            "realised_imbalance_per_layer": None if realised_LW is None else imbalance_of_worker_loads(realised_LW),
            "rebalances": [r.as_dict() for r in self.records],
            "last_decision": None if self.last_decision is None else self.last_decision.reason,
            "in_flight_version": None if self.in_flight is None else self.in_flight.placement.version,
            "drifts_detected": list(self.drifts_detected),
            "planner": self.planner_view(),
            "tier": None if self.tiers is None else self.tiers.view(),
        }
        if timeline:
            out["timeline"] = step_timeline(ranges, self.window_steps)
            out["last_rebalance_rows"] = rows_around_last_commit(self.records, ranges, self.window_steps)
        return out

    def planner_view(self) -> dict:
        """The configured planner, the topology it plans on (and why), the last planner that ran."""
        t = self.topology
        return {"configured": self.planning.mode, "nodes": t.num_nodes, "workers_per_node": t.workers_per_node,
                "topology_reason": self.topology_reason,
                "last": None if self.last_choice is None else self.last_choice.planner,
                "last_reason": None if self.last_choice is None else self.last_choice.reason}

    def summary(self) -> dict:
        current = self.current_imbalance() if self.load_LE.sum() else np.ones(self.placement.num_layers)
        return {
            "placement_version": self.placement.version,
            "window_steps": self.window.steps,
            "load_LE": self.load_LE,
            "imbalance_mean": float(current.mean()),
            "imbalance_worst": float(current.max()),
            "imbalance_per_layer": current,
            "last_decision": None if self.last_decision is None else self.last_decision.reason,
            "rebalances": [r.as_dict() for r in self.records],
            "history": list(self.history),
            "drifts_detected": list(self.drifts_detected),
            "planner": self.planner_view(),
            "tier": None if self.tiers is None else self.tiers.view(),
            "time": time.time(),
        }

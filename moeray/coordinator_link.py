"""The engine's link to its coordinator: start it, tell when it is lost, rebuild it from what
outlives it, and watch for a rebalance that is stuck.

    engine.restart_coordinator(reason)               # a fresh coordinator (placement, log, load so far)
    engine.coordinator_view(timeline, timeout_s)     # the serving thread's view (never waits on a rebuild)
    engine.rebalance_health()                        # /healthz: ok | stopped | restarting, stuck rebalances
    engine.stats(flush=True)                         # the coordinator's summary, workers' counts flushed first

`CoordinatorLinkMixin` holds the Engine's methods for this (moeray/engine.py: `class
Engine(..., CoordinatorLinkMixin)`); they work on the engine's own state. The coordinator itself
is moeray/coordinator.py (actor) and moeray/coordinator_core.py (logic); the stuck check is the
pure watch in moeray/rebalance_watch.py.
"""

from __future__ import annotations

import time

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from moeray.coordinator import Coordinator
from moeray.errors import WorkerLost
from moeray.rebalance_watch import PendingRebalance, watch_rebalance
from moeray.recovery import PING_TIMEOUT_S
from placement.metrics import worker_loads


class CoordinatorLinkMixin:
    """Engine methods: the coordinator's start, loss and rebuild, its views and statistics, the
    stuck watch."""

    # ---- statistics ----------------------------------------------------------------------------
    def stats(self, flush: bool = True) -> dict:
        """Coordinator view: windowed load [L, E], per-worker load [L, W], imbalance mean/worst,
        placement version and the log of every rebalance. `flush` ships the workers' pending
        counts first and waits until the coordinator has them."""
        if self.coordinator is None:
            raise RuntimeError("stats need stats.enabled=True")
        self._coordinator_started(block=True)
        try:
            if flush:
                self._flush_stats()
            summary = self._get(self.coordinator.summary.remote(), 60, "stats")
        except (WorkerLost, RayActorError) as exc:
            if self._coordinator_alive():
                raise
            # The coordinator is gone: rebuilt (placement, log, load so far), then asked again.
            self.restart_coordinator(f"coordinator lost: {type(exc).__name__}")
            summary = self._get(self.coordinator.summary.remote(), 60, "stats")
        self._coordinator_records = summary["rebalances"]
        summary["events"] = list(self.events)
        summary["epoch"] = self.epoch
        summary["workers"] = len(self.workers)
        summary["target_workers"] = self.target_workers
        summary["rebalance_health"] = self.rebalance_health()
        p = self._placement
        summary["worker_load_LW"] = worker_loads(summary["load_LE"], p.phy2log, p.slots_per_worker, p.replica_weights,
                                                 p.shard_width)
        return summary

    def _flush_stats(self) -> None:
        """Workers ship their pending counts; returns once the coordinator has them. With the worker
        loops running the request is a loop message, so every worker ships at the same step."""
        if self.loops is not None and self.loops.running:
            self.loops.flush()
            return
        boxes = self._get([w.flush_stats.remote() for w in self.workers], 60, "flush stats")
        self._get([ref for box in boxes for ref in box], 60, "flush stats")

    def set_stats_recording(self, enabled: bool) -> None:
        """Switch routing statistics on or off on every worker (e.g. to measure their cost)."""
        if enabled and self.coordinator is None:
            raise RuntimeError("stats recording needs stats.enabled=True at start-up")
        self._get([w.set_stats_recording.remote(enabled) for w in self.workers], 60, "set stats recording")
        if enabled and self.loops is not None and self.loops.running:
            # The loops may have been at different steps when counting resumed: one agreed flush
            # realigns every worker's next step range (the misaligned partial one is dropped).
            self.loops.flush()

    # ---- start, loss, rebuild -------------------------------------------------------------------

    def _start_coordinator(self, restored: dict | None = None) -> None:
        self._spawn_coordinator(restored)
        self._get(self.coordinator.ping.remote(), 120, "coordinator start-up")
        self._get([w.attach_coordinator.remote(self.coordinator, self.epoch) for w in self.workers], 60, "attach coordinator")

    def _spawn_coordinator(self, restored: dict | None) -> None:
        """Create the coordinator actor (returns at once; its process starts in the background)."""
        coordinator_cls = ray.remote(Coordinator)
        self.coordinator = coordinator_cls.options(num_cpus=0).remote(
            self._placement, self.config, self.workers, self.epoch, self.node_ids, restored)

    def restart_coordinator(self, reason: str, wait: bool = True) -> None:
        """A fresh coordinator rebuilt from what outlives the old one: the engine's committed
        placement and split weights, the workers and epoch, the rebalance log the engine last
        saw, the load each worker counted since start-up (a prior for the new window), and a
        version counter above every version any worker ran or staged (no version is reused).
        `wait=False` (the step path): its process starts while steps go on; `poll_rebalance`
        attaches the workers once it answers, and no policy check runs meanwhile."""
        detected_at_s = self._coordinator_down_since or time.time()
        started = time.perf_counter()
        try:
            ray.kill(self.coordinator)
        except Exception:
            pass
        self._tick_ref = None
        self._coordinator_down, self._coordinator_down_since = False, None
        self._coordinator_generation += 1
        if self._staged is not None or not self._commit_out:
            # Nothing staged can commit any more (a commit already sent still lands: committed()
            # then hands the rebuilt coordinator the result).
            self._staged = None
            self._discard_staging()
        restored = {"highest_version": self.newest_version(), "records": self._kept_records(),
                    "load_LE": self._cumulative_load()}
        self._spawn_coordinator(restored)
        self._coordinator_starting = {
            "ping": self.coordinator.ping.remote(), "started": started,
            "event": {"kind": "coordinator_restart", "reason": reason, "step": self.steps, "epoch": self.epoch,
                      "placement_version": self._placement.version, "rebalances_kept": len(restored["records"]),
                      "detected_at_s": detected_at_s}}
        if wait:
            self._coordinator_started(block=True)

    def _coordinator_started(self, block: bool) -> bool:
        """Whether a rebuilt coordinator is serving: once it answers, the workers attach to it and
        the event is logged (detected at, recovered at, seconds)."""
        starting = self._coordinator_starting
        if starting is None:
            return True
        if not block and not ray.wait([starting["ping"]], timeout=0)[0]:
            return False
        try:
            self._get(starting["ping"], 120, "coordinator start-up")
            self._get([w.attach_coordinator.remote(self.coordinator, self.epoch) for w in self.workers], 60,
                      "attach coordinator")
        except WorkerLost:
            if block:
                raise
            # On the step path a failed start is no step failure: marked down, rebuilt at the next check.
            self._coordinator_starting = None
            self._coordinator_down = True
            return False
        self._coordinator_starting = None
        now = time.time()
        self.events.append({**starting["event"], "recovered_at_s": now,
                            "seconds": now - starting["event"]["detected_at_s"],
                            "restart_seconds": time.perf_counter() - starting["started"]})
        return True

    def _kept_records(self) -> list[dict]:
        """The newest copy of the rebalance log the engine holds (never waits on the coordinator)."""
        if self._records_ref is not None:
            ready, _ = ray.wait([self._records_ref], timeout=0)
            if ready:
                try:
                    self._coordinator_records = ray.get(self._records_ref)
                except Exception:
                    pass  # it died before answering: the copy before it stands
                self._records_ref = None  # (one not answered yet stays asked for)
        return self._coordinator_records

    def _coordinator_alive(self) -> bool:
        try:
            ray.get(self.coordinator.ping.remote(), timeout=PING_TIMEOUT_S)
            return True
        except Exception:
            return False

    def _coordinator_lost(self, exc: BaseException) -> bool:
        """Whether an error of a coordinator call means the coordinator itself is gone."""
        cause = exc.__cause__ if isinstance(exc, WorkerLost) else exc  # _get wraps the Ray error
        return isinstance(cause, (RayActorError, GetTimeoutError))

    def _discard_staging(self) -> None:
        """Every worker drops a staged version (one the lost coordinator prepared can never commit)."""
        try:
            self._get([w.discard_staging.remote() for w in self.workers], PING_TIMEOUT_S, "discard staging")
        except WorkerLost:
            self.healthy = False  # a worker is gone too: the next step recovers it

    def _cumulative_load(self) -> np.ndarray | None:
        try:
            return self.load()
        except WorkerLost:
            return None

    def newest_version(self) -> int:
        """The newest placement version the engine or any live worker ran or staged."""
        refs = [w.newest_version.remote() for w in self.workers]
        versions = []
        for ref in refs:  # one by one: a dead worker must not hide what the live ones staged
            try:
                versions.append(ray.get(ref, timeout=PING_TIMEOUT_S))
            except Exception:
                pass
        known = [self._placement.version] + versions
        known += [e["placement_version"] for e in self.events if e.get("placement_version") is not None]
        known += [r["version"] for r in self._kept_records()]
        return max(known)

    def coordinator_view(self, timeline: bool, timeout_s: float) -> dict | None:
        """The coordinator's compact view (None without one, or while it is lost: the stepping
        thread rebuilds it at the next policy check). Keeps a copy of its rebalance log."""
        if self.coordinator is None:
            return None
        if self._coordinator_starting is not None and not self._coordinator_started(block=False):
            return None  # a rebuilt one is still starting: never wait for it on the serving thread
        try:
            view = ray.get(self.coordinator.view.remote(timeline), timeout=timeout_s)
        except (RayActorError, GetTimeoutError):
            self._coordinator_down_since = self._coordinator_down_since or time.time()
            self._coordinator_down = True
            return None
        self._coordinator_records = view["rebalances"]
        return view

    def _abandon_if_stuck(self, now: float) -> bool:
        """Abandon a rebalance pending for longer than stuck_timeout_s (moeray/rebalance_watch.py):
        logged, and a fresh coordinator. Whether it did."""
        pending = self._pending_rebalance()
        decision, self._watch = watch_rebalance(self._watch, pending, now, self.config.rebalance.stuck_timeout_s)
        if decision.abandon:
            self.rebalance_errors.append(decision.reason)
            self.events.append({"kind": "rebalance_stuck", "reason": decision.reason, "step": self.steps,
                                "epoch": self.epoch, "version": pending.version, "detected_at_s": now})
            self.restart_coordinator(decision.reason, wait=False)  # the stuck prepare dies with it; staging dropped
            return True
        return False

    @property
    def _commit_out(self) -> bool:
        """A commit request is with the workers (driver path: the step carrying it; loops: sent,
        switch not reported yet)."""
        return self._committing is not None or (self.loops is not None and self.loops._commit is not None)

    def _pending_rebalance(self) -> PendingRebalance | None:
        if self._tick_ref is not None:
            return PendingRebalance("prepare", self._tick_started_s)
        # Staged but not sent waits for the next step (an idle server is not stuck); a commit is
        # pending from the moment it was sent (take_staged) until a worker reports the switch.
        staged = self._committing or (self.loops._commit if self.loops is not None else None)
        if staged is not None:
            return PendingRebalance("commit", self._staged_at_s, staged["version"])
        return None

    def rebalance_health(self) -> dict:
        """For /healthz: "ok", or "stopped" when rebalancing is on but no coordinator answers (it is
        rebuilt at the next policy check); stuck rebalances abandoned so far, the last one."""
        enabled = self.config.coordinator_ticks and self.coordinator is not None  # the policy or live tiering
        state = ("off" if not self.config.coordinator_ticks else
                 "stopped" if self._coordinator_down or self.coordinator is None else
                 "restarting" if self._coordinator_starting is not None else "ok")
        pending = self._pending_rebalance()
        age = None if pending is None else time.time() - pending.since_s
        return {"state": state, "enabled": enabled,
                "pending": None if pending is None else {"phase": pending.phase, "version": pending.version,
                                                         "seconds": age},
                "stuck": age is not None and age > self.config.rebalance.stuck_timeout_s,
                "stuck_abandoned": self._watch.stuck_total,
                "last_stuck": self._watch.last_stuck,
                "coordinator_restarts": sum(e["kind"] == "coordinator_restart" for e in self.events)}

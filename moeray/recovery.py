"""Membership recovery: bring an engine back after a worker died, tell which workers are lost,
and start the workers a shrunk engine grows back with.

    event = engine.recover()                         # after a failed step: a new epoch, the group re-formed
    engine.probe()                                   # between steps: does every worker answer?
    engine.poll_rejoin()                             # after a shrink: replacements start in the background

`RecoveryMixin` holds the Engine's methods for this (moeray/engine.py: `class Engine(RecoveryMixin,
...)`); they work on the engine's own state. The membership changes themselves (a shrink to the
survivors, a new count) are in moeray/scaling.py. This module also holds the timeouts by which the
engine tells a lost worker from a slow one.
"""

from __future__ import annotations

import time

import ray

from moeray.errors import CollectiveError, WorkerLost

# How long the driver waits for a step beyond the collective timeout: a step on a live group ends
# (or raises) within the collective timeout, so anything past this margin means a lost worker.
STEP_MARGIN_S = 30.0
PING_TIMEOUT_S = 10.0  # a live worker answers a ping from a free actor thread at once
_RECOVERY_ROUNDS = 3


class RecoveryMixin:
    """Engine methods: recover(), probe(), poll_rejoin() and the steps of a recovery."""

    def recover(self, force: bool = False, detected_at_s: float | None = None) -> dict | None:
        """Bring the engine back after a worker died. With `parallel.recovery="shrink"` (CPU) the
        survivors go on at once as a smaller group (moeray/scaling.py: the dead workers' experts
        come back from live replicas, else the checkpoint; a balanced placement for the new
        count), and a replacement joins later when the cluster has room (`poll_rejoin`). With
        "replace" (and always on GPUs, see _replace_dead_workers) dead ranks are replaced on their
        placement-group bundles at the same count. Either way: a new epoch, the coordinator
        follows, a migration staged but not committed is abandoned. Returns the event.

        Bounded: each phase has a timeout; a worker lost while the group re-forms starts another
        round (at most _RECOVERY_ROUNDS), after which WorkerLost is raised. Safe to call again
        after a failed attempt; a no-op (None) on a healthy engine unless `force`.
        """
        if self.healthy and not force:
            return None
        detected_at_s = time.time() if detected_at_s is None else detected_at_s
        started = time.perf_counter()
        from_workers = len(self.workers)
        timeout = self.config.parallel.collective_timeout_s
        dropped = []  # staged versions that can no longer commit (survivors drop their staging)
        if self._tick_ref is not None:  # let an in-flight policy check end; it fails if it met the dead
            try:
                result = ray.get(self._tick_ref, timeout=timeout + STEP_MARGIN_S)
                if result is not None:
                    dropped.append(result["version"])
            except Exception:
                pass  # the coordinator recorded the failed migration itself
            self._tick_ref = None
        if self._staged is not None:
            dropped.append(self._staged["version"])
            self._staged = None
        # A step that failed while committing v+1: some workers may have switched. Adopt v+1 for
        # everyone (replacements and any survivor still on v re-read their slots for it).
        adopted, self._committing = self._committing, None
        if adopted is not None:
            self._adopt(adopted)
        if self.joiners is not None:  # they were started for the old membership
            self.joiners.cancel(self)
            self.joiners = None
        replaced: set[int] = set()
        shrink: dict | None = None
        for attempt in range(_RECOVERY_ROUNDS):  # a worker may die while the group re-forms
            try:
                dead = self._dead_ranks()
                if dead and self._shrinks():
                    shrink = self._shrink(dead)
                if shrink is not None:
                    break
                replaced |= self._replace_dead_workers(dead)
                self._align_survivors_to_placement()
                self._get([w.resync_steps.remote(self.steps) for w in self.workers], timeout, "step resync")
                self.epoch += 1
                if len(self.workers) > 1:
                    self._form_group()
                break
            except (WorkerLost, CollectiveError):
                if attempt == _RECOVERY_ROUNDS - 1:
                    raise
                self.healthy = False
        if self.coordinator is not None and self._coordinator_starting is not None:
            try:
                self._coordinator_started(block=True)
            except WorkerLost:
                pass  # the resync below finds it gone and rebuilds it
        if self.coordinator is not None and shrink is None:
            # One idempotent call: the engine's committed placement is the truth (a migration in
            # flight is then committed or abandoned there), so a retried recovery converges.
            try:
                ray.get(self.coordinator.resync.remote(self._placement, self.workers, self.epoch, self.steps),
                        timeout=PING_TIMEOUT_S)
                self._get([w.attach_coordinator.remote(self.coordinator, self.epoch) for w in self.workers], 60,
                          "attach coordinator")
            except Exception as exc:  # the coordinator died, hangs or failed: rebuilt
                self.restart_coordinator(f"coordinator lost during recovery: {type(exc).__name__}")
        self.healthy = True
        if shrink is not None and not self.config.parallel.rejoin:
            self.target_workers = len(self.workers)
        event = {"kind": "recovery", "mode": "shrink" if shrink is not None else "replace",
                 "step": self.steps, "epoch": self.epoch, "from_workers": from_workers, "to_workers": len(self.workers),
                 "replaced": sorted(replaced), "lost_ranks": shrink["lost_ranks"] if shrink else sorted(replaced),
                 "dropped_staged_versions": dropped,
                 "adopted_version": None if adopted is None else adopted["version"],
                 # of the (layer, expert) pairs the lost workers held: those a survivor's replica
                 # serves on; slot copies fetched from live workers; slots read from the checkpoint
                 "experts_lost": shrink["experts_lost"] if shrink else self._slots_of(sorted(replaced)),
                 "experts_from_replicas": shrink["experts_kept_by_replicas"] if shrink else 0,
                 "slots_from_replicas": shrink["slots_from_replicas"] if shrink else 0,
                 "slots_from_checkpoint": (shrink["slots_read_from_checkpoint"] if shrink
                                             else self._slots_of(sorted(replaced))),
                 "placement_version": self._placement.version,
                 "predicted_imbalance": shrink["predicted_imbalance"] if shrink else None,
                 "detected_at_s": detected_at_s, "recovered_at_s": time.time(),
                 "seconds": time.perf_counter() - started, "requests_rerun": None}
        self.events.append(event)
        return event

    def _dead_ranks(self) -> list[int]:
        """Ranks to replace or drop. CPU: the workers that do not answer. CUDA: every worker, since
        a survivor's CUDA context ran the NCCL kernels of the aborted group (and its watchdog may
        end the process at any moment): restarting from the checkpoint is the state we trust."""
        if self.config.parallel.device == "cuda":
            return list(range(len(self.workers)))
        # Alive = its step thread is free within the collective timeout (a step stuck in a
        # collective ends by then; one stuck elsewhere never does, and counts as dead).
        lock_s = self.config.parallel.collective_timeout_s + PING_TIMEOUT_S
        probes = [w.step_thread_free.remote(lock_s) for w in self.workers]
        dead = []
        for rank, probe in enumerate(probes):
            try:
                if not ray.get(probe, timeout=lock_s + PING_TIMEOUT_S):
                    dead.append(rank)
            except Exception:  # the actor is dead or does not answer
                dead.append(rank)
        return dead

    def _shrinks(self) -> bool:
        """Whether a loss shrinks the group (else dead ranks are replaced): CPU workers only (GPU
        survivors are restarted anyway), and only while the survivors can hold every expert."""
        return self.config.parallel.recovery == "shrink" and self.config.parallel.device == "cpu"

    def _shrink(self, dead: list[int]) -> dict | None:
        """The survivors as the new group (scaling.shrink_to_survivors); None when they cannot
        hold every expert (then the dead are replaced instead)."""
        from moeray.scaling import shrink_to_survivors

        survivors = [w for rank, w in enumerate(self.workers) if rank not in dead]
        if not survivors:
            return None
        try:
            from moeray.scaling import scaled_config

            scaled_config(self.config, len(survivors))
        except ValueError:
            return None
        self._get([w.reset_membership.remote() for w in survivors], self.config.parallel.collective_timeout_s,
                  "reset membership")
        return shrink_to_survivors(self, dead)

    def _replace_dead_workers(self, dead: list[int]) -> set[int]:
        """Start a replacement for each dead rank on its bundle (survivors drop the broken group and
        their staging, keep their slots); also ranks a failed scale never started. Ranks started."""
        if self.config.parallel.device != "cuda":
            survivors = [w for rank, w in enumerate(self.workers) if rank not in dead]
            self._get([w.reset_membership.remote() for w in survivors], self.config.parallel.collective_timeout_s,
                      "reset membership")
        for rank in dead:
            ray.kill(self.workers[rank])
            self.workers[rank] = self._start_worker(rank)
        # A scale that failed before starting its new ranks: start them now (their bundles exist).
        missing = list(range(len(self.workers), self.config.parallel.num_workers))
        self.workers += [self._start_worker(rank) for rank in missing]
        started = dead + missing
        self._get([self.workers[rank].ping.remote() for rank in started], 300, "replacement start-up")
        return set(started)

    def _align_survivors_to_placement(self) -> None:
        """Every worker on the engine's committed placement (a survivor may be one version off
        after a failed commit step); those that are not re-read their slots from the checkpoint."""
        p = self._placement
        versions = self._get([w.placement_version.remote() for w in self.workers], PING_TIMEOUT_S, "versions")
        # reconfigure, not just a reload: after a scale that failed part-way a survivor may also be
        # on the old worker count and slots per worker.
        behind = [(rank, w) for rank, (w, v) in enumerate(zip(self.workers, versions)) if v != p.version]
        self._get([w.reconfigure.remote(rank, self.config, p) for rank, w in behind], 300, "reload slots")

    def _slots_of(self, ranks: list[int]) -> int:
        return sum(int((self._placement.slots_of_worker(r) >= 0).sum()) for r in ranks
                   if r < self._placement.num_workers)

    def probe(self) -> bool:
        """Whether every worker answers a ping (cheap; for health checks between steps). A dead
        one marks the engine unhealthy, so the next step or recover() deals with it."""
        try:
            self._get([w.ping.remote() for w in self.workers], PING_TIMEOUT_S, "probe")
        except WorkerLost:
            self.healthy = False
        return self.healthy

    def poll_rejoin(self) -> bool:
        """After a shrink (or a scale up requested): start the missing workers in the background
        when there are fewer than `target_workers`; True once they have started and can join
        (the driver then scales to the target between steps). Never blocks."""
        if self.joiners is not None and self.joiners.target != self.target_workers:
            self.joiners.cancel(self)  # started for another count
            self.joiners = None
        if len(self.workers) >= self.target_workers or not self.healthy:
            return False
        if self.joiners is None:
            if time.time() < self.rejoin_not_before_s:
                return False  # a rejoin failed a moment ago: back off
            from moeray.scaling import start_joiners

            self.joiners = start_joiners(self, self.target_workers)
            return False
        try:
            return self.joiners.ready()
        except Exception:  # a joiner died while loading: let them go, start again after a back-off
            self.joiners.cancel(self)
            self.joiners = None
            self.rejoin_not_before_s = time.time() + 10.0
            return False

"""The driver-side API: start a worker group on Ray, run lockstep steps, shut down.

    engine = Engine(config, checkpoint_dir)        # checks the checkpoint, then starts Ray if needed
    results = engine.step(plans)                    # one StepPlan per worker, run in lockstep
    engine.load()                                   # [L, E] routed pairs per expert so far
    engine.stats()                                  # coordinator view: window load, imbalance, log
    engine.rebalance(force=True)                    # stage v+1 now; the next step commits it
    engine.placement()                              # the placement every worker runs
    engine.shutdown()

The engine is the only sequencer of steps: a staged placement is committed by passing its version
with the next step to every worker, so all workers switch at the same step boundary.

Which sequences each worker runs is decided by the generation scheduler
(moeray/generation/scheduler.py, driven by moeray/generation/driver.py); the engine only runs the
plans, one per worker, every worker in every step (an idle one with an empty plan).

Legend: L MoE layers, E experts, S slots, W workers.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moeray.comm.group import NCCL_SAFETY_ENV, GroupSpec, register_backends
from moeray.config import EngineConfig
from moeray.coordinator import Coordinator
from moeray.errors import CollectiveError, WorkerLost
from moeray.generation.messages import StepPlan, StepResult
from moeray.models.checkpoint import check_checkpoint
from moeray.rebalance_watch import PendingRebalance, WatchState, watch_rebalance
from moeray.ray_cluster import ensure_ray
from moeray.worker import Worker
from placement import Placement
from placement.metrics import imbalance, worker_loads

# How long the driver waits for a step beyond the collective timeout: a step on a live group ends
# (or raises) within the collective timeout, so anything past this margin means a lost worker.
_STEP_MARGIN_S = 30.0
_PING_TIMEOUT_S = 10.0  # a live worker answers a ping from a free actor thread at once
_RECOVERY_ROUNDS = 3


class Engine:
    def __init__(self, config: EngineConfig, checkpoint_dir: str, placement: Placement | None = None):
        self.config = config
        self.checkpoint_dir = str(checkpoint_dir)
        # Headers only, before any worker starts: a wrong path or a mismatched model is one clear
        # error in well under a second, not a worker crash buried in Ray's logs.
        check_checkpoint(self.checkpoint_dir, config.model)
        par = config.parallel
        model = config.model
        self._placement = (placement or Placement.contiguous(
            model.num_moe_layers, model.num_experts, par.num_workers, config.slots_per_worker
        )).validate()
        if self._placement.num_workers != par.num_workers or self._placement.slots_per_worker != config.slots_per_worker:
            raise ValueError(
                f"placement has {self._placement.num_workers} workers x {self._placement.slots_per_worker} slots, "
                f"config asks for {par.num_workers} x {config.slots_per_worker}"
            )
        ensure_ray()
        register_backends()
        self.epoch = 0
        self._uid = uuid.uuid4().hex[:8]
        bundle = {"CPU": par.cpus_per_worker, **({"GPU": 1} if par.device == "cuda" else {})}
        self._pg = placement_group([bundle] * par.num_workers, strategy="PACK")
        try:
            ray.get(self._pg.ready(), timeout=par.placement_timeout_s)
        except GetTimeoutError:
            remove_placement_group(self._pg)
            raise RuntimeError(
                f"cannot place {par.num_workers} workers x {bundle} within placement_timeout_s={par.placement_timeout_s:g}; "
                f"the cluster has {ray.available_resources()} available"
            ) from None
        self._pgs = [self._pg]
        self._bundles = [(self._pg, i) for i in range(par.num_workers)]  # rank -> (placement group, bundle)
        self._free_bundles: list[tuple] = []  # reserved bundles no worker uses (after a scale-down)
        # Membership changes and coordinator rebuilds, in order (kind "scale" | "recovery" |
        # "coordinator_restart" | "rebalance_stuck"): stats(), /v1/placement, metrics.
        self.events: list[dict] = []
        self.target_workers = par.num_workers  # what a shrunk engine grows back to (rejoin)
        self.joiners = None  # scaling.Joiners: workers starting for a scale up / rejoin
        # split of replicated experts' tokens; None = equal (a resumed placement brings its own)
        self.replica_weights_LS = None if self._placement.replica_weights is None else np.array(self._placement.replica_weights)
        self.workers = [self._start_worker(i) for i in range(par.num_workers)]
        self._get([w.ping.remote() for w in self.workers], timeout=300, what="worker start-up")
        if par.num_workers > 1:
            self._form_group()
        self.steps = 0
        self.coordinator = None
        self._tick_ref = None
        self._staged: dict | None = None  # placement staged on every worker, committed at the next step
        self.rebalance_errors: list[str] = []
        self._coordinator_records: list[dict] = []  # the last rebalance log seen (kept if it dies)
        self._records_ref = None  # a copy of the log asked for after each commit, read when needed
        self._tick_started_s = 0.0  # when the policy check / prepare in flight started (stuck watch)
        self._coordinator_down = False  # a call found it dead; the stepping thread rebuilds it
        self._coordinator_down_since: float | None = None
        self._coordinator_starting: dict | None = None  # a rebuilt coordinator whose process is starting
        self._staged_at_s = 0.0
        self._watch = WatchState()
        self._coordinator_generation = 0  # counts rebuilds: a placement staged by a dead one is told apart
        self.healthy = True  # False after a failed step, until recover()
        self._committing: dict | None = None  # the staged placement a running step commits
        self._last_tick_step = 0
        self.loops = None  # LoopClient while the workers run their own step loops (generation/loop_client.py)
        if config.stats.enabled:
            self._start_coordinator()

    @property
    def recoveries(self) -> list[dict]:
        return [e for e in self.events if e["kind"] == "recovery"]

    @property
    def scale_events(self) -> list[dict]:
        return [e for e in self.events if e["kind"] == "scale"]

    def _start_worker(self, rank: int, config: EngineConfig | None = None, bundle: tuple | None = None,
                      phy2log_LS: np.ndarray | None = None):
        """Worker `rank` on its placement-group bundle (by default the engine's config, bundle of
        that rank and committed placement; joiners bring their own)."""
        config = config or self.config
        par = config.parallel
        group, index = bundle or self._bundles[rank]
        return ray.remote(Worker).options(
            num_cpus=par.cpus_per_worker,
            # steps on one thread (or the worker's own loop thread); the loop's long-poll drain,
            # its messages, migration staging / exports and probes on the others
            max_concurrency=6,
            num_gpus=1 if par.device == "cuda" else 0,
            # NCCL settings must be in the environment before the worker imports torch.
            runtime_env={"env_vars": dict(NCCL_SAFETY_ENV)} if par.device == "cuda" else None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
        ).remote(rank, config, self.checkpoint_dir, self._placement.phy2log if phy2log_LS is None else phy2log_LS,
                 self._placement.version, self.replica_weights_LS if phy2log_LS is None else None)

    def _start_coordinator(self, restored: dict | None = None) -> None:
        self._spawn_coordinator(restored)
        self._get(self.coordinator.ping.remote(), 120, "coordinator start-up")
        self._get([w.attach_coordinator.remote(self.coordinator, self.epoch) for w in self.workers], 60, "attach coordinator")

    def _spawn_coordinator(self, restored: dict | None) -> None:
        """Create the coordinator actor (returns at once; its process starts in the background)."""
        coordinator_cls = ray.remote(Coordinator)
        self.coordinator = coordinator_cls.options(num_cpus=0).remote(
            self._placement.phy2log, self._placement.version, self.config.model.num_experts,
            self.config.slots_per_worker, self.config.model.expert_bytes, self.config.rebalance.model_dump(),
            self.workers, self.epoch, self.config.parallel.collective_timeout_s, self.config.parallel.device,
            self.replica_weights_LS, restored)

    # ---- membership --------------------------------------------------------------------------
    @property
    def group_name(self) -> str:
        return f"moeray-{self._uid}-epoch{self.epoch}"

    def _form_group(self) -> None:
        """A fresh group name per epoch: NCCL communicators cannot change membership, and a name
        reused after a crash would meet the dead group's state."""
        timeout = self.config.parallel.collective_timeout_s
        backend = "MOERAY_NCCL" if self.config.parallel.device == "cuda" else "MOERAY_GLOO"
        addr = self._get(self.workers[0].open_rendezvous.remote(self.group_name), timeout, "rendezvous")
        specs = [GroupSpec(self.group_name, len(self.workers), rank, addr, timeout, backend) for rank in range(len(self.workers))]
        self._get([w.join_group.remote(s) for w, s in zip(self.workers, specs)], timeout + _STEP_MARGIN_S, "group join")

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
                result = ray.get(self._tick_ref, timeout=timeout + _STEP_MARGIN_S)
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
            p = self._placement
            try:
                ray.get(self.coordinator.resync.remote(p.phy2log, p.version, self.replica_weights_LS, self.workers,
                                                       self.epoch, self.steps), timeout=_PING_TIMEOUT_S)
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
                 "experts_from_checkpoint": (shrink["slots_read_from_checkpoint"] if shrink
                                             else self._slots_of(sorted(replaced))),
                 "placement_version": self._placement.version,
                 "predicted_imbalance": shrink["predicted_imbalance"] if shrink else None,
                 "detected_at_s": detected_at_s, "recovered_at_s": time.time(),
                 "seconds": time.perf_counter() - started, "requests_rerun": None}
        self.events.append(event)
        return event

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

    def _slots_of(self, ranks: list[int]) -> int:
        return sum(int((self._placement.slots_of_worker(r) >= 0).sum()) for r in ranks
                   if r < self._placement.num_workers)

    def poll_rejoin(self) -> bool:
        """After a shrink (or a scale up requested): start the missing workers in the background
        when there are fewer than `target_workers`; True once they have started and can join
        (the driver then scales to the target between steps). Never blocks."""
        if len(self.workers) >= self.target_workers or not self.healthy:
            if self.joiners is not None and self.joiners.target != self.target_workers:
                self.joiners.cancel(self)
                self.joiners = None
            return False
        if self.joiners is not None and self.joiners.target != self.target_workers:
            self.joiners.cancel(self)
            self.joiners = None
        if self.joiners is None:
            from moeray.scaling import start_joiners

            self.joiners = start_joiners(self, self.target_workers)
            return False
        return self.joiners.ready()

    # ---- the coordinator ---------------------------------------------------------------------
    def _coordinator_lost(self, exc: BaseException) -> bool:
        """Whether an error of a coordinator call means the coordinator itself is gone."""
        cause = exc.__cause__ if isinstance(exc, WorkerLost) else exc
        return isinstance(cause, (RayActorError, GetTimeoutError)) or (
            isinstance(exc, WorkerLost) and "coordinator" in str(exc))

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
        commit_out = self._committing is not None or (self.loops is not None and self.loops._commit is not None)
        if self._staged is not None or not commit_out:
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
        self._get(starting["ping"], 120, "coordinator start-up")
        self._get([w.attach_coordinator.remote(self.coordinator, self.epoch) for w in self.workers], 60,
                  "attach coordinator")
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
            self._records_ref = None
        return self._coordinator_records

    def _coordinator_alive(self) -> bool:
        try:
            ray.get(self.coordinator.ping.remote(), timeout=_PING_TIMEOUT_S)
            return True
        except Exception:
            return False

    def _discard_staging(self) -> None:
        """Every worker drops a staged version (one the lost coordinator prepared can never commit)."""
        try:
            self._get([w.discard_staging.remote() for w in self.workers], _PING_TIMEOUT_S, "discard staging")
        except WorkerLost:
            self.healthy = False  # a worker is gone too: the next step recovers it

    def _cumulative_load(self) -> np.ndarray | None:
        try:
            return self.load()
        except WorkerLost:
            return None

    def newest_version(self) -> int:
        """The newest placement version the engine or any live worker ran or staged."""
        try:
            versions = self._get([w.newest_version.remote() for w in self.workers], _PING_TIMEOUT_S, "versions")
        except WorkerLost:
            versions = []
        known = [self._placement.version] + [v for v in versions]
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

    def _adopt(self, staged: dict) -> None:
        """Make a staged placement (as the coordinator returned it) the engine's committed one."""
        self._placement = Placement(staged["phy2log"], self.config.model.num_experts, self.config.slots_per_worker,
                                    staged["version"])
        self.replica_weights_LS = staged["replica_weights"]

    def probe(self) -> bool:
        """Whether every worker answers a ping (cheap; for health checks between steps). A dead
        one marks the engine unhealthy, so the next step or recover() deals with it."""
        try:
            self._get([w.ping.remote() for w in self.workers], _PING_TIMEOUT_S, "probe")
        except WorkerLost:
            self.healthy = False
        return self.healthy

    def _align_survivors_to_placement(self) -> None:
        """Every worker on the engine's committed placement (a survivor may be one version off
        after a failed commit step); those that are not re-read their slots from the checkpoint."""
        p = self._placement
        versions = self._get([w.placement_version.remote() for w in self.workers], _PING_TIMEOUT_S, "versions")
        # reconfigure, not just a reload: after a scale that failed part-way a survivor may also be
        # on the old worker count and slots per worker.
        behind = [(rank, w) for rank, (w, v) in enumerate(zip(self.workers, versions)) if v != p.version]
        self._get([w.reconfigure.remote(rank, self.config, p.phy2log, p.version, self.replica_weights_LS)
                   for rank, w in behind], 300, "reload slots")

    def _dead_ranks(self) -> list[int]:
        """Ranks to replace or drop. CPU: the workers that do not answer. CUDA: every worker, since
        a survivor's CUDA context ran the NCCL kernels of the aborted group (and its watchdog may
        end the process at any moment): restarting from the checkpoint is the state we trust."""
        if self.config.parallel.device == "cuda":
            return list(range(len(self.workers)))
        # Alive = its step thread is free within the collective timeout (a step stuck in a
        # collective ends by then; one stuck elsewhere never does, and counts as dead).
        lock_s = self.config.parallel.collective_timeout_s + _PING_TIMEOUT_S
        probes = [w.step_thread_free.remote(lock_s) for w in self.workers]
        dead = []
        for rank, probe in enumerate(probes):
            try:
                if not ray.get(probe, timeout=lock_s + _PING_TIMEOUT_S):
                    dead.append(rank)
            except Exception:  # the actor is dead or does not answer
                dead.append(rank)
        return dead

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

    # ---- serving -----------------------------------------------------------------------------
    def step(self, plans: list[StepPlan]) -> list[StepResult]:
        """Run one lockstep step: worker w runs plans[w] (an empty plan still joins every exchange)."""
        if not self.healthy:
            raise WorkerLost("a previous step failed: call recover() before stepping again")
        if self.loops is not None and self.loops.running:
            raise RuntimeError("the workers run their own step loops: stop them before stepping from the driver")
        if len(plans) != len(self.workers):
            raise ValueError(f"step needs one plan per worker: got {len(plans)} plans for {len(self.workers)} workers")
        staged = self.take_staged()
        version = staged["version"] if staged else self._placement.version
        refs = [w.step.remote(plan, version) for w, plan in zip(self.workers, plans)]
        try:
            outs = self._get(refs, self.config.parallel.collective_timeout_s + _STEP_MARGIN_S, "step")
        except Exception as exc:
            # A lost worker or collective, or any failure of a commit step (some workers may have
            # switched versions): only recover() helps. Other step errors leave the engine as it was.
            if staged is not None or isinstance(exc, (WorkerLost, CollectiveError)):
                self.healthy = False
            raise
        self.steps += 1
        if staged:  # every worker ran this step with the new version: it is committed
            self.committed(staged, self.steps - 1)
        if self.coordinator is not None and self.config.rebalance.enabled:
            self.poll_rebalance()
        return outs

    def take_staged(self) -> dict | None:
        """The placement staged on every worker, for the step about to be sent to commit it. From
        now until `committed`, the workers may be on either version (recover() adopts it)."""
        staged, self._staged = self._staged, None
        self._committing = staged
        return staged

    def committed(self, staged: dict, step: int) -> None:
        """Every worker switched to `staged` before `step`: it is the engine's placement now."""
        self._committing = None
        self._adopt(staged)
        if self.coordinator is None:
            return
        if staged.get("coordinator") == self._coordinator_generation:
            self.coordinator.committed.remote(staged["version"], step)
            self._records_ref = self.coordinator.records.remote()  # after the commit (calls run in order)
        else:  # prepared by a coordinator that died since: the rebuilt one takes it as the truth
            p = self._placement
            self.coordinator.resync.remote(p.phy2log, p.version, self.replica_weights_LS, self.workers, self.epoch, step)

    def scale(self, num_workers: int) -> dict:
        """Change the worker count between steps (moeray/scaling.py): a placement for the new
        count, workers started or ended, a new epoch. Sequences on staying workers stay."""
        from moeray.scaling import scale_engine, scaled_config

        scaled_config(self.config, num_workers)  # a bad count changes nothing, not even the target
        joiners, self.joiners = self.joiners, None
        if joiners is not None and (joiners.target != num_workers or not joiners.ready()):
            joiners.cancel(self)  # started for another count, or not up yet: new ranks start now
            joiners = None
        self.target_workers = num_workers
        return scale_engine(self, num_workers, joiners)

    def reset_sequences(self) -> None:
        """Every worker forgets its sequences and frees their KV cache (after a recovery the driver
        re-submits what was in flight)."""
        self._get([w.reset_sequences.remote() for w in self.workers], 60, "reset sequences")

    # ---- rebalancing -------------------------------------------------------------------------
    def poll_rebalance(self) -> None:
        """Start a policy check every check_interval steps; pick up a staged placement when the
        coordinator has one; rebuild a coordinator found dead; abandon a rebalance that is stuck
        (moeray/rebalance_watch.py). Never blocks the step loop."""
        if self._coordinator_down:
            self.restart_coordinator("coordinator found dead", wait=False)
            return
        if not self._coordinator_started(block=False):
            return
        now = time.time()
        pending = self._pending_rebalance()
        decision, self._watch = watch_rebalance(self._watch, pending, now, self.config.rebalance.stuck_timeout_s)
        if decision.abandon:
            self.rebalance_errors.append(decision.reason)
            self.events.append({"kind": "rebalance_stuck", "reason": decision.reason, "step": self.steps,
                                "epoch": self.epoch, "version": pending.version, "detected_at_s": now})
            self.restart_coordinator(decision.reason, wait=False)  # the stuck prepare dies with it; staging dropped
            return
        if self._tick_ref is None:
            # Steps since the last check (the worker loops report steps in batches, not one by one).
            if self.steps - self._last_tick_step >= self.config.rebalance.check_interval_steps:
                self._last_tick_step = self.steps
                self._tick_ref = self.coordinator.tick.remote()
                self._tick_started_s = now
            return
        ready, _ = ray.wait([self._tick_ref], timeout=0)
        if ready:
            ref, self._tick_ref = self._tick_ref, None
            try:
                self._staged = self._tagged(ray.get(ref))
                self._staged_at_s = now
            except RayActorError:
                self._coordinator_down_since = now
                self.restart_coordinator("coordinator died during a policy check", wait=False)
            except Exception as exc:  # the migration was abandoned; serving goes on with the current version
                self.rebalance_errors.append(f"{type(exc).__name__}: {exc}")

    def _tagged(self, staged: dict | None) -> dict | None:
        """A tick's staged placement, marked with the coordinator that prepared it."""
        if staged is not None:
            staged["coordinator"] = self._coordinator_generation
        return staged

    def _pending_rebalance(self) -> PendingRebalance | None:
        if self._tick_ref is not None:
            return PendingRebalance("prepare", self._tick_started_s)
        staged = self._staged or self._committing or (self.loops._commit if self.loops is not None else None)
        if staged is not None:
            return PendingRebalance("commit", self._staged_at_s, staged["version"])
        return None

    def rebalance_health(self) -> dict:
        """For /healthz: "ok", or "stopped" when rebalancing is on but no coordinator answers (it is
        rebuilt at the next policy check); stuck rebalances abandoned so far, the last one."""
        enabled = self.config.rebalance.enabled and self.coordinator is not None
        state = ("off" if not self.config.rebalance.enabled else
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

    def rebalance(self, force: bool = True) -> int | None:
        """Plan and stage a new placement now; it is committed at the next step. Returns its version.
        A coordinator found dead is rebuilt first (one retry)."""
        if self.coordinator is None:
            raise RuntimeError("rebalancing needs stats.enabled=True")
        self._coordinator_started(block=True)
        if self._coordinator_down:
            self.restart_coordinator("coordinator found dead")
        try:
            return self._rebalance(force)
        except (WorkerLost, RayActorError) as exc:
            if self._coordinator_alive():
                raise
            self.restart_coordinator(f"coordinator lost: {type(exc).__name__}")
            return self._rebalance(force)

    def _rebalance(self, force: bool) -> int | None:
        if self._tick_ref is not None:
            self._staged = self._tagged(self._get(self._tick_ref, self.config.parallel.collective_timeout_s + _STEP_MARGIN_S,
                                                  "rebalance"))
            self._tick_ref = None
        if self._staged is None:
            if force:
                self._flush_stats()  # plan from every step served so far, not from the last snapshot
            try:
                self._staged = self._tagged(self._get(self.coordinator.tick.remote(None, force),
                                                      self.config.parallel.collective_timeout_s + _STEP_MARGIN_S,
                                                      "rebalance"))
                self._staged_at_s = time.time()
            except RayTaskError as exc:  # the migration failed and was abandoned; serving is unaffected
                self.rebalance_errors.append(f"{type(exc.cause).__name__}: {exc.cause}")
                return None
        return None if self._staged is None else self._staged["version"]

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
        summary["worker_load_LW"] = worker_loads(summary["load_LE"], p.phy2log, p.slots_per_worker, self.replica_weights_LS)
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

    def placement(self) -> Placement:
        """The placement every worker runs now (committed; a staged one is not yet in effect)."""
        return self._placement

    def load(self) -> np.ndarray:
        """[L, E] routed (token, k) pairs per logical expert since start-up, summed over workers."""
        counts = self._get([w.load_counts.remote() for w in self.workers], 60, "load counts")
        return np.sum(counts, axis=0)

    def worker_load(self, load_LE: np.ndarray | None = None) -> np.ndarray:
        """[L, N] pairs each worker computes under the current placement and replica split weights."""
        p = self._placement
        return worker_loads(self.load() if load_LE is None else load_LE, p.phy2log, p.slots_per_worker, self.replica_weights_LS)

    def imbalance(self, load_LE: np.ndarray | None = None) -> np.ndarray:
        """[L] max/mean worker load per layer under the current placement."""
        return imbalance(self.load() if load_LE is None else load_LE, self._placement, self.replica_weights_LS)

    # ---- plumbing ----------------------------------------------------------------------------
    def _get(self, refs, timeout: float, what: str):
        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError as exc:
            raise WorkerLost(f"{what}: no answer from the workers within {timeout:g}s") from exc
        except RayActorError as exc:
            raise WorkerLost(f"{what}: a worker died ({exc.__class__.__name__}: {str(exc)[:200]})") from exc

    def shutdown(self) -> None:
        for w in self.workers + ([self.coordinator] if self.coordinator is not None else []):
            try:
                ray.kill(w)
            except Exception:
                pass
        self.workers = []
        for group in self._pgs:
            try:
                remove_placement_group(group)
            except Exception:
                pass

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

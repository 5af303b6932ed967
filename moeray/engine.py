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

The rest of the engine lives beside it: membership recovery (recover, probe, poll_rejoin) in
moeray/recovery.py, the coordinator's lifecycle (start, loss, rebuild, its views, the stuck-rebalance
watch) in moeray/coordinator_link.py, both as mixins `Engine` inherits; membership changes
(scale, shrink to the survivors, joiners) in moeray/scaling.py.

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
from moeray.coordinator_link import CoordinatorLinkMixin
from moeray.errors import CollectiveError, WorkerLost
from moeray.generation.messages import StepPlan, StepResult
from moeray.models.checkpoint import check_checkpoint
from moeray.rebalance_watch import WatchState
from moeray.ray_cluster import ensure_ray
from moeray.recovery import STEP_MARGIN_S, RecoveryMixin
from moeray.worker import Worker
from placement import Placement
from placement.metrics import imbalance, worker_loads


class Engine(RecoveryMixin, CoordinatorLinkMixin):
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
        self.rejoin_not_before_s = 0.0  # back-off after a failed rejoin
        self.workers = [self._start_worker(i) for i in range(par.num_workers)]
        # the node each rank started on: the coordinator's topology (parallel.workers_per_node=None)
        self.node_ids = self._get([w.node_id.remote() for w in self.workers], timeout=300, what="worker start-up")
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
    def replica_weights_LS(self) -> np.ndarray | None:
        """[L, S] split of replicated experts' tokens of the committed placement (read-only; None =
        equal split). The placement carries them: set the placement, never the weights."""
        return self._placement.replica_weights

    @property
    def recoveries(self) -> list[dict]:
        return [e for e in self.events if e["kind"] == "recovery"]

    @property
    def scale_events(self) -> list[dict]:
        return [e for e in self.events if e["kind"] == "scale"]

    def _start_worker(self, rank: int, config: EngineConfig | None = None, bundle: tuple | None = None,
                      placement: Placement | None = None):
        """Worker `rank` on its placement-group bundle (by default the engine's config, bundle of
        that rank and committed placement, split weights included; joiners bring their own)."""
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
        ).remote(rank, config, self.checkpoint_dir, self._placement if placement is None else placement)

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
        self._get([w.join_group.remote(s) for w, s in zip(self.workers, specs)], timeout + STEP_MARGIN_S, "group join")

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
            outs = self._get(refs, self.config.parallel.collective_timeout_s + STEP_MARGIN_S, "step")
        except Exception as exc:
            # A lost worker or collective, or any failure of a commit step (some workers may have
            # switched versions): only recover() helps. Other step errors leave the engine as it was.
            if staged is not None or isinstance(exc, (WorkerLost, CollectiveError)):
                self.healthy = False
            raise
        self.steps += 1
        if staged:  # every worker ran this step with the new version: it is committed
            self.committed(staged, self.steps - 1)
        if self.coordinator is not None and self.config.coordinator_ticks:
            self.poll_rebalance()
        return outs

    @property
    def has_staged(self) -> bool:
        """A placement is staged on every worker, waiting for a step to commit it."""
        return self._staged is not None

    def take_staged(self) -> dict | None:
        """The placement staged on every worker, for the step about to be sent to commit it. From
        now until `committed`, the workers may be on either version (recover() adopts it)."""
        staged, self._staged = self._staged, None
        self._committing = staged
        if staged is not None:
            self._staged_at_s = time.time()  # the commit phase's clock starts when it is sent
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
            self.coordinator.resync.remote(self._placement, self.workers, self.epoch, step)

    def _adopt(self, staged: dict) -> None:
        """Make a staged placement (as the coordinator returned it) the engine's committed one."""
        self._placement = staged["placement"]

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
        if self._tick_ref is not None and ray.wait([self._tick_ref], timeout=0)[0]:
            self._collect_tick(now)  # finished (maybe long ago, on an idle server): never "stuck"
            if self._coordinator_starting is not None:
                return  # it met a dead coordinator: the rebuilt one starts first
        if self._abandon_if_stuck(now):
            return
        if self._tick_ref is None:
            # Steps since the last check (the worker loops report steps in batches, not one by one).
            # None while a commit is out: the coordinator would plan from the version being replaced.
            if not self._commit_out and self.steps - self._last_tick_step >= self.config.rebalance.check_interval_steps:
                self._last_tick_step = self.steps
                self._tick_ref = self.coordinator.tick.remote()
                self._tick_started_s = now
            return

    def _collect_tick(self, now: float) -> None:
        """The finished policy check's result: a staged placement, an abandoned migration, or a dead
        coordinator (rebuilt)."""
        ref, self._tick_ref = self._tick_ref, None
        try:
            self._staged = self._tagged(ray.get(ref))
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

    def rebalance(self, force: bool = True, placement: Placement | None = None) -> int | None:
        """Plan and stage a new placement now; it is committed at the next step. Returns its version.
        `placement`: stage this one instead of the planner's (any slot map, split weights and shard
        widths for the running group's shape; a ValueError names what does not fit).
        A coordinator found dead is rebuilt first (one retry)."""
        if self.coordinator is None:
            raise RuntimeError("rebalancing needs stats.enabled=True")
        self._coordinator_started(block=True)
        if self._coordinator_down:
            self.restart_coordinator("coordinator found dead")
        try:
            return self._rebalance(force, placement)
        except (WorkerLost, RayActorError) as exc:
            if self._coordinator_alive():
                raise
            self.restart_coordinator(f"coordinator lost: {type(exc).__name__}")
            return self._rebalance(force, placement)

    def _rebalance(self, force: bool, requested: Placement | None = None) -> int | None:
        if self._tick_ref is not None:
            self._staged = self._tagged(self._get(self._tick_ref, self.config.parallel.collective_timeout_s + STEP_MARGIN_S,
                                                  "rebalance"))
            self._tick_ref = None
        if self._staged is not None and requested is not None:
            raise RuntimeError(f"placement v{self._staged['version']} is staged: step once to commit it, then request another")
        if self._staged is None:
            if force:
                self._flush_stats()  # plan from every step served so far, not from the last snapshot
            try:
                self._staged = self._tagged(self._get(self.coordinator.tick.remote(None, force, requested),
                                                      self.config.parallel.collective_timeout_s + STEP_MARGIN_S,
                                                      "rebalance"))
                self._staged_at_s = time.time()
            except RayTaskError as exc:  # the migration failed and was abandoned; serving is unaffected
                if requested is not None and isinstance(exc.cause, ValueError):
                    raise exc.cause from None  # a requested placement that does not fit: the caller's error
                self.rebalance_errors.append(f"{type(exc.cause).__name__}: {exc.cause}")
                return None
        return None if self._staged is None else self._staged["version"]

    def placement(self) -> Placement:
        """The placement every worker runs now (committed; a staged one is not yet in effect)."""
        return self._placement

    def load(self) -> np.ndarray:
        """[L, E] routed (token, k) pairs per logical expert since start-up, summed over workers."""
        counts = self._get([w.load_counts.remote() for w in self.workers], 60, "load counts")
        return np.sum(counts, axis=0)

    def worker_load(self, load_LE: np.ndarray | None = None) -> np.ndarray:
        """[L, W] pairs each worker computes under the current placement and replica split weights."""
        p = self._placement
        return worker_loads(self.load() if load_LE is None else load_LE, p.phy2log, p.slots_per_worker, p.replica_weights,
                            p.shard_width)

    def imbalance(self, load_LE: np.ndarray | None = None) -> np.ndarray:
        """[L] max/mean worker load per layer under the current placement."""
        return imbalance(self.load() if load_LE is None else load_LE, self._placement)

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

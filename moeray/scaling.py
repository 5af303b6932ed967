"""Change an engine's membership while it serves: a new worker count (`Engine.scale`), or the
survivors of a lost worker going on without it (`Engine.recover` with `parallel.recovery="shrink"`).

    joiners = start_joiners(engine, 4)      # new workers load the checkpoint while serving goes on
    event = scale_engine(engine, 4, joiners) # between steps, once joiners.ready()
    event = shrink_to_survivors(engine, dead_ranks=[1])

Between steps (the driver stops the worker loops first and hands the leaving workers' sequences
to the others, see GenerationDriver.scale):
1. the new config (slots per worker follow the count unless set explicitly) and a placement for
   the new count from the load measured so far (`placement.resize.resize_plan`: staying workers
   keep what they hold, every expert keeps a copy, the migration-aware planner re-plans; after a
   loss `survivors_first` makes the survivors ranks 0..W'-1 in their old order);
2. new ranks get placement-group bundles (pre-started joiners bring theirs; else bundles freed
   earlier, then a new group: a cluster that cannot place them fails the scale before anything
   changed);
3. every slot a worker needs and does not hold is exported by a live worker that holds it (its
   copy goes through the object store: a drained leaving worker's, or a surviving replica of a
   lost worker's expert); only experts whose every copy was lost are read from the checkpoint;
4. leaving workers end, staying ones (and joiners) reconfigure in place (sequences and KV cache
   stay), freed bundles are kept for a rejoin (a group with no worker left is removed);
5. a new epoch's group forms and the coordinator follows (new topology; its log stays).

Legend: L layers, E experts, S slots, W workers.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import ray
from pydantic import ValidationError
from ray.util.placement_group import placement_group, remove_placement_group

from moeray.config import EngineConfig
from moeray.errors import WorkerLost
from placement import Placement
from moeray.recovery import STEP_MARGIN_S
from placement.fault_aware import FaultAwareOptions
from placement.resize import carry_over, resize_plan, survivors_first

_COORDINATOR_TIMEOUT_S = 10.0  # a live coordinator answers at once (its work runs on other threads)


def scaled_config(config: EngineConfig, num_workers: int) -> EngineConfig:
    """The config for `num_workers`, or ValueError naming the bad value (a count that is no
    integer >= 1, too few slots for every expert) before anything changes."""
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    try:
        return EngineConfig.model_validate({**config.model_dump(),
                                            "parallel": {**config.parallel.model_dump(), "num_workers": num_workers}})
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


def scale_engine(engine, num_workers: int, joiners: Joiners | None = None) -> dict:
    """Scale between steps to `num_workers`: the highest ranks leave, new ranks join (`joiners`:
    workers started beforehand by `start_joiners` while serving went on, else started now)."""
    config = scaled_config(engine.config, num_workers)
    if engine.loops is not None and engine.loops.running:
        raise RuntimeError("stop the worker loops before scaling (GenerationDriver.scale does)")
    if not engine.healthy:
        raise WorkerLost("the engine lost a worker: recover() before scaling")
    started = time.perf_counter()
    _drop_staged(engine)
    load_LE, version = _load_and_version(engine, flush=True)
    plan = resize_plan(load_LE, engine._placement, num_workers, config.slots_per_worker, config.model.expert_bytes,
                       fault_aware=_fault_aware(config))
    staying = list(range(min(len(engine.workers), num_workers)))
    event = _change_membership(engine, config, plan, version, staying, dead=[], joiners=joiners)
    event.update(kind="scale", seconds=time.perf_counter() - started)
    engine.events.append(event)
    return event


def shrink_to_survivors(engine, dead_ranks: list[int]) -> dict:
    """Recovery without waiting for a replacement: the survivors go on as a smaller group now
    (renumbered in rank order), the experts the dead held come back from the survivors' live
    replicas where there are any, else from the checkpoint, and the placement is re-planned for
    the new count. ValueError (nothing changed) when the survivors cannot hold every expert."""
    survivors = [rank for rank in range(len(engine.workers)) if rank not in set(dead_ranks)]
    if not survivors:
        raise ValueError("no worker survived: nothing to shrink to")
    config = scaled_config(engine.config, len(survivors))
    load_LE, version = _load_and_version(engine, flush=False)
    lost = engine._placement
    # (layer, expert) pairs the dead held, and those of them a survivor still holds a copy of
    held_by = [{(layer, int(e)) for layer, row in enumerate(lost.slots_of_worker(rank)) for e in row if e >= 0}
               for rank in range(lost.num_workers)]
    on_dead = set().union(*(held_by[rank] for rank in dead_ranks))
    on_survivors = set().union(*(held_by[rank] for rank in survivors))
    carried = survivors_first(lost, survivors)
    plan = resize_plan(load_LE, carried, len(survivors), config.slots_per_worker, config.model.expert_bytes,
                       fault_aware=_fault_aware(config))
    event = _change_membership(engine, config, plan, version, survivors, dead=list(dead_ranks), joiners=None)
    event["experts_lost"] = len(on_dead)
    event["experts_kept_by_replicas"] = len(on_dead & on_survivors)  # served on by a survivor's copy
    return event


@dataclass
class Joiners:
    """Workers started for ranks that do not exist yet (a scale up or a rejoin after a shrink):
    they load the checkpoint while the engine serves, and join at the next membership change."""

    target: int  # the worker count they make up
    workers: list  # actor handles, for ranks len(engine.workers) .. target - 1
    bundles: list[tuple]  # their placement-group bundles
    pings: list  # one ping ref each: ready when the worker has loaded

    def ready(self) -> bool:
        """Whether every joiner has loaded; raises if one failed to start (ray.wait counts a failed
        ping as ready, so the pings are read)."""
        done, _ = ray.wait(self.pings, num_returns=len(self.pings), timeout=0)
        if len(done) < len(self.pings):
            return False
        ray.get(self.pings)
        return True

    def wait(self, timeout_s: float) -> None:
        ray.wait(self.pings, num_returns=len(self.pings), timeout=timeout_s)

    def cancel(self, engine) -> None:
        for worker in self.workers:
            ray.kill(worker)
        engine._free_bundles += self.bundles


def start_joiners(engine, target: int) -> Joiners:
    """Start the workers a scale up to `target` needs, without waiting for them: their bundles
    (freed ones first, else a new placement group that may wait for the cluster to grow) and
    their start-up (a checkpoint read) overlap serving. Their slots are a guess of the next
    placement (the current one carried over); `scale_engine` reconfigures them when they join."""
    config = scaled_config(engine.config, target)
    first = len(engine.workers)
    bundles = _reserve_bundles(engine, target - first, config, wait=False)
    carried = carry_over(engine._placement, target, config.slots_per_worker,
                         np.ones((engine._placement.num_layers, config.model.num_experts)))
    guess = Placement(carried, config.model.num_experts, config.slots_per_worker, engine._placement.version)
    workers = [engine._start_worker(rank, config=config, bundle=bundles[rank - first], placement=guess)
               for rank in range(first, target)]
    return Joiners(target, workers, bundles, [w.ping.remote() for w in workers])


def _fault_aware(config: EngineConfig) -> FaultAwareOptions | None:
    return FaultAwareOptions() if config.rebalance.fault_aware else None


def _load_and_version(engine, flush: bool) -> tuple[np.ndarray | None, int]:
    """The measured load [L, E] (None: unknown, plan for uniform) and a placement version nobody
    used before, from the coordinator; without a reachable one, above every version any worker
    ran or staged."""
    if engine.coordinator is not None:
        try:
            engine._coordinator_started(block=True)
            load_LE = engine.stats(flush=True)["load_LE"] if flush else engine._get(
                engine.coordinator.summary.remote(), _COORDINATOR_TIMEOUT_S, "stats")["load_LE"]
            return load_LE, engine._get(engine.coordinator.reserve_version.remote(), _COORDINATOR_TIMEOUT_S,
                                        "reserve a placement version")
        except WorkerLost:
            if flush:
                raise
    return None, engine.newest_version() + 1


def _change_membership(engine, config: EngineConfig, plan, version: int, staying: list[int], dead: list[int],
                       joiners: Joiners | None) -> dict:
    """Ranks `staying` (old ranks, in their new order) go on as ranks 0.., the other old workers
    leave, new ranks come from `joiners` or start now; one new epoch. Returns the event."""
    started = time.perf_counter()
    timeout = engine.config.parallel.collective_timeout_s
    num_workers = config.parallel.num_workers
    old_workers, old_count = list(engine.workers), len(engine.workers)
    placement = dataclasses.replace(plan.placement, version=version).validate()  # split weights included
    if joiners is not None and joiners.target != num_workers:
        joiners.cancel(engine)
        joiners = None
    new_bundles = joiners.bundles if joiners is not None else _reserve_bundles(
        engine, num_workers - len(staying), config)  # may fail: nothing changed yet
    # From here a failure leaves the engine part-way: unhealthy until recover() (which replaces
    # what is missing on engine.workers / engine._bundles, both kept consistent at every point).
    engine.healthy = False
    # Every live copy the new ranks need is exported before anyone leaves or reconfigures.
    alive = [rank for rank in range(old_count) if rank not in set(dead)]
    joining = [] if joiners is None else joiners.workers
    sources = _live_sources(engine, {rank: old_workers[rank] for rank in alive},
                            [old_workers[rank] for rank in staying] + joining, placement)
    reconfiguring = [old_workers[rank] for rank in staying] + ([] if joiners is None else joiners.workers)
    try:
        moved = engine._get([w.reconfigure.remote(rank, config, placement, sources[rank])
                             for rank, w in enumerate(reconfiguring)], 300, "reconfigure workers")
    except Exception:
        for worker in [] if joiners is None else joiners.workers:
            ray.kill(worker)  # half-configured: recover() starts fresh ones on their bundles
        raise
    finally:
        # Leaving workers end only now: they own the object-store copies of the slots they
        # exported, which the others fetch during reconfigure (a dead owner's objects are lost).
        for rank, worker in enumerate(old_workers):
            if rank not in staying:
                ray.kill(worker)
        engine.workers = [old_workers[rank] for rank in staying]
        _rebind_bundles(engine, staying, new_bundles)
        engine.config = config
        engine._placement = placement
    engine.workers = reconfiguring
    fresh = list(range(len(engine.workers), num_workers))
    engine.workers += [engine._start_worker(rank) for rank in fresh]
    engine._get([w.ping.remote() for w in engine.workers[len(staying):]], 300, "new worker start-up")
    engine._get([w.resync_steps.remote(engine.steps) for w in engine.workers], timeout, "step resync")
    engine.epoch += 1
    if num_workers > 1:
        engine._form_group()
    _follow_coordinator(engine, placement)
    engine.healthy = True
    return {"step": engine.steps, "epoch": engine.epoch, "from_workers": old_count, "to_workers": num_workers,
            "lost_ranks": sorted(dead), "placement_version": version, "slots_per_worker": config.slots_per_worker,
            "slots_copied_locally": sum(m["slots_copied"] for m in moved),
            "slots_from_replicas": sum(m["slots_from_replicas"] for m in moved),
            "slots_read_from_checkpoint": sum(m["slots_read"] for m in moved)
                                         + sum(int((placement.slots_of_worker(r) >= 0).sum()) for r in fresh),
            "joiners_prestarted": 0 if joiners is None else len(joiners.workers),
            "predicted_imbalance": float(plan.predicted_imbalance_LAYERS.mean()),
            "membership_seconds": time.perf_counter() - started}


def _live_sources(engine, holders: dict, targets: list, placement: Placement) -> list[dict]:
    """Per new rank r (targets[r] becomes rank r), {(layer, expert): ([ref], index)} for every
    expert its new slots need that it does not hold but a live worker does: that worker's copy is
    exported to the object store (one export call per source worker). `holders`: old rank ->
    handle of every live worker. What each worker holds comes from the worker itself (after a
    failed membership change the engine's placement may not be what a worker runs). Sources take
    turns over the holders of each expert, so no one worker exports everything."""
    timeout = engine.config.parallel.collective_timeout_s
    handles = {**{f"h{rank}": h for rank, h in holders.items()}, **{f"t{r}": h for r, h in enumerate(targets)}}
    held = dict(zip(handles, engine._get([h.held_slots.remote() for h in handles.values()], timeout, "held slots")))
    wanted: dict[int, list[tuple[int, int, int]]] = {}  # source rank -> [(new rank, layer, expert)]
    entries: dict[int, list[tuple[int, int]]] = {}  # source rank -> [(layer, local slot)]
    turn = 0
    for new_rank in range(len(targets)):
        mine_LS, have_LS = placement.slots_of_worker(new_rank), held[f"t{new_rank}"]
        for layer in range(placement.num_layers):
            have = set(have_LS[layer][have_LS[layer] >= 0].tolist())
            for expert in sorted(set(mine_LS[layer][mine_LS[layer] >= 0].tolist()) - have):
                owners = [(rank, int(np.flatnonzero(held[f"h{rank}"][layer] == expert)[0]))
                          for rank in holders if (held[f"h{rank}"][layer] == expert).any()]
                if not owners:
                    continue  # every copy was on a lost worker: the checkpoint has it
                source, local_slot = owners[turn % len(owners)]
                turn += 1
                wanted.setdefault(source, []).append((new_rank, layer, expert))
                entries.setdefault(source, []).append((layer, local_slot))
    sources: list[dict] = [{} for _ in targets]
    exports = {rank: holders[rank].export_slots.remote(entries[rank]) for rank in entries}
    boxes = engine._get(list(exports.values()), timeout, "export live slots")
    for rank, box in zip(exports, boxes):
        for index, (new_rank, layer, expert) in enumerate(wanted[rank]):
            sources[new_rank][(layer, expert)] = (box, index)
    return sources


def _follow_coordinator(engine, placement: Placement) -> None:
    """The coordinator takes the new topology (a migration in flight is abandoned there); one that
    died or does not answer is rebuilt (Engine.restart_coordinator)."""
    if engine.coordinator is None:
        return
    try:
        engine._get(engine.coordinator.resize.remote(placement, engine.workers, engine.epoch),
                    _COORDINATOR_TIMEOUT_S, "coordinator resize")
        engine._get([w.attach_coordinator.remote(engine.coordinator, engine.epoch) for w in engine.workers], 60,
                    "attach coordinator")
    except WorkerLost as exc:
        if not engine._coordinator_lost(exc):
            raise
        engine.restart_coordinator(f"coordinator lost during a membership change: {exc}")


def _drop_staged(engine) -> None:
    """A placement staged for the old workers can no longer commit: workers drop it (reconfigure
    discards their staging) and the coordinator abandons it (resize)."""
    if engine._tick_ref is not None:
        try:
            ray.get(engine._tick_ref, timeout=engine.config.parallel.collective_timeout_s + STEP_MARGIN_S)
        except Exception:
            pass  # the coordinator recorded the failed migration itself
        engine._tick_ref = None
    engine._staged = None


def _reserve_bundles(engine, count: int, config: EngineConfig, wait: bool = True) -> list[tuple]:
    """`count` placement-group bundles for new ranks: bundles released by an earlier scale-down
    first (a placement group keeps every bundle reserved until the whole group is removed), then
    one new group for the rest. Raises naming the resources when the cluster cannot place them."""
    if count <= 0:
        return []
    reused, engine._free_bundles = engine._free_bundles[:count], engine._free_bundles[count:]
    if len(reused) == count:
        return reused
    par = config.parallel
    bundle = {"CPU": par.cpus_per_worker, **({"GPU": 1} if par.device == "cuda" else {})}
    missing = count - len(reused)
    group = placement_group([bundle] * missing, strategy="PACK")
    if not wait:  # joiners: their actors wait for the group themselves, serving goes on meanwhile
        engine._pgs.append(group)
        return reused + [(group, i) for i in range(missing)]
    try:
        ray.get(group.ready(), timeout=par.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        engine._free_bundles = reused + engine._free_bundles
        raise RuntimeError(
            f"cannot place {missing} more workers x {bundle} within placement_timeout_s="
            f"{par.placement_timeout_s:g}; the cluster has {ray.available_resources()} available") from None
    engine._pgs.append(group)
    return reused + [(group, i) for i in range(missing)]


def _rebind_bundles(engine, staying: list[int], new_bundles: list[tuple]) -> None:
    """Ranks 0.. get the staying workers' bundles in their new order, then `new_bundles`; every
    other bundle becomes free (a rejoin reuses it); a group none of whose bundles holds a worker
    is removed (its resources go back to the cluster)."""
    kept = [engine._bundles[rank] for rank in staying]
    engine._free_bundles += [b for rank, b in enumerate(engine._bundles) if rank not in set(staying)]
    engine._bundles = kept + list(new_bundles)
    in_use = {id(group) for group, _ in engine._bundles}
    for group in [g for g in engine._pgs if id(g) not in in_use]:
        remove_placement_group(group)
        engine._pgs.remove(group)
        engine._free_bundles = [b for b in engine._free_bundles if b[0] is not group]

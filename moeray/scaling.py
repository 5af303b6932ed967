"""Change an engine's worker count while it serves (`Engine.scale`).

    event = scale_engine(engine, num_workers)

Between steps (the driver stops the worker loops first and hands the leaving workers' sequences
to the others, see GenerationDriver.scale):
1. the new config (slots per worker follow the count unless set explicitly) and a placement for
   the new count from the load measured so far (`placement.resize.resize_plan`: staying workers
   keep what they hold, every expert keeps a copy, the migration-aware planner re-plans);
2. new ranks get placement-group bundles first (bundles a scale-down freed, then a new group; a
   cluster that cannot place them fails the scale before anything changed); leaving workers (the
   highest ranks) end and their bundles are freed (a group with no worker left is removed); new
   workers start and read their slots from the checkpoint;
3. staying workers reconfigure in place (their sequences and KV cache stay): a slot whose expert
   they already hold is copied locally, any other is read from the checkpoint;
4. a new epoch's group forms and the coordinator follows (new topology; its log stays).

Legend: L layers, E experts, S slots, W workers.
"""

from __future__ import annotations

import time

import ray
from pydantic import ValidationError
from ray.util.placement_group import placement_group, remove_placement_group

from moeray.config import EngineConfig
from moeray.errors import WorkerLost
from placement import Placement
from placement.resize import resize_plan


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


def scale_engine(engine, num_workers: int) -> dict:
    config = scaled_config(engine.config, num_workers)
    if engine.loops is not None and engine.loops.running:
        raise RuntimeError("stop the worker loops before scaling (GenerationDriver.scale does)")
    if not engine.healthy:
        raise WorkerLost("the engine lost a worker: recover() before scaling")
    old_count = len(engine.workers)
    started = time.perf_counter()
    timeout = engine.config.parallel.collective_timeout_s
    _drop_staged(engine)
    load_LE = None
    version = engine._placement.version + 1
    if engine.coordinator is not None:
        load_LE = engine.stats(flush=True)["load_LE"]
        version = engine._get(engine.coordinator.reserve_version.remote(), 60, "reserve a placement version")
    plan = resize_plan(load_LE, engine._placement, num_workers, config.slots_per_worker, config.model.expert_bytes)
    placement = Placement(plan.placement.phy2log, config.model.num_experts, config.slots_per_worker, version).validate()

    leaving = engine.workers[num_workers:]
    staying = engine.workers[:num_workers]
    new_bundles = _reserve_bundles(engine, num_workers - old_count, config)  # may fail: nothing changed yet
    # From here a failure leaves the engine part-way: unhealthy until recover() (which replaces
    # what is missing on engine.workers / engine._bundles, both kept consistent at every point).
    engine.healthy = False
    for worker in leaving:
        ray.kill(worker)
    engine.workers = list(staying)
    engine._bundles += new_bundles  # before the release: a group is removed when no rank holds it
    _release_bundles(engine, num_workers)
    engine.config = config
    engine._placement = placement
    engine.replica_weights_LS = plan.replica_weights
    moved = engine._get([w.reconfigure.remote(rank, config, placement.phy2log, version, plan.replica_weights)
                         for rank, w in enumerate(staying)], 300, "reconfigure workers")
    for rank in range(len(staying), num_workers):
        engine.workers.append(engine._start_worker(rank))
    engine._get([w.ping.remote() for w in engine.workers[len(staying):]], 300, "new worker start-up")
    engine._get([w.resync_steps.remote(engine.steps) for w in engine.workers], timeout, "step resync")
    engine.epoch += 1
    if num_workers > 1:
        engine._form_group()
    if engine.coordinator is not None:
        engine._get(engine.coordinator.resize.remote(placement.phy2log, version, config.slots_per_worker,
                                                     plan.replica_weights, engine.workers, engine.epoch), 60,
                    "coordinator resize")
        engine._get([w.attach_coordinator.remote(engine.coordinator, engine.epoch) for w in engine.workers], 60,
                    "attach coordinator")
    engine.healthy = True
    event = {"step": engine.steps, "epoch": engine.epoch, "from_workers": old_count, "to_workers": num_workers,
             "placement_version": version, "slots_per_worker": config.slots_per_worker,
             "slots_copied_locally": sum(m["slots_copied"] for m in moved),
             "slots_read_from_checkpoint": sum(m["slots_read"] for m in moved)
                                         + sum(int((placement.slots_of_worker(r) >= 0).sum())
                                               for r in range(len(staying), num_workers)),
             "predicted_imbalance": float(plan.predicted_imbalance_LAYERS.mean()),
             "seconds": time.perf_counter() - started}
    engine.scale_events.append(event)
    return event


def _drop_staged(engine) -> None:
    """A placement staged for the old workers can no longer commit: workers drop it (reconfigure
    discards their staging) and the coordinator abandons it (resize)."""
    if engine._tick_ref is not None:
        try:
            ray.get(engine._tick_ref, timeout=engine.config.parallel.collective_timeout_s + 30)
        except Exception:
            pass  # the coordinator recorded the failed migration itself
        engine._tick_ref = None
    engine._staged = None


def _reserve_bundles(engine, count: int, config: EngineConfig) -> list[tuple]:
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


def _release_bundles(engine, num_workers: int) -> None:
    """Bundles of ranks >= num_workers become free; a group none of whose bundles holds a worker is
    removed (its resources go back to the cluster)."""
    engine._free_bundles += engine._bundles[num_workers:]
    engine._bundles = engine._bundles[:num_workers]
    in_use = {id(group) for group, _ in engine._bundles}
    for group in [g for g in engine._pgs if id(g) not in in_use]:
        remove_placement_group(group)
        engine._pgs.remove(group)
        engine._free_bundles = [b for b in engine._free_bundles if b[0] is not group]

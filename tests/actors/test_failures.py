"""A dead or silent peer makes the survivors raise within the collective timeout, never hang; a
recovered engine serves on (and the generation driver re-runs what was in flight).

Most tests here step the engine from the driver (`step_loop="driver"`: one `Engine.step` per step)
to place a failure at an exact step; the last ones do the same to the workers' own step loops."""

import time

import numpy as np
import pytest
import ray
from ray.exceptions import RayTaskError

from moeray.config import EngineConfig, ParallelConfig
from moeray.engine import Engine
from moeray.errors import CollectiveError, WorkerLost
from moeray.generation.messages import StepPlan
from tests.helpers import engine_logits, make_checkpoint, max_rel_error, reference_logits

TIMEOUT_S = 3.0


@pytest.fixture
def engine(ray_cluster, tmp_path):
    ckpt, model_cfg, _ = make_checkpoint(tmp_path, seed=2)
    config = EngineConfig(model=model_cfg, parallel=ParallelConfig(num_workers=3, collective_timeout_s=TIMEOUT_S,
                                                                    step_loop="driver"))
    with Engine(config, ckpt) as eng:
        engine_logits(eng, [np.arange(9)])  # the group is formed and has completed a step
        yield eng


def replicated_engine(tmp_path, seed: int, step_loop: str = "driver"):
    """(engine, reference model, a skewed batch): 3 CPU workers with a spare slot each, so a forced
    rebalance replicates the hot expert."""
    ckpt, model_cfg, reference = make_checkpoint(tmp_path, seed=seed, family="mixtral", num_experts=8, top_k=2)
    # recovery="replace": these tests are about replacing a dead rank at the same count (the
    # default, shrinking to the survivors, is tests/actors/test_elastic.py)
    config = EngineConfig(model=model_cfg, parallel=ParallelConfig(num_workers=3, redundant_slots_per_worker=1,
                                                                   collective_timeout_s=TIMEOUT_S, step_loop=step_loop,
                                                                   recovery="replace"))
    rng = np.random.default_rng(seed)
    skewed = np.where(rng.random(300) < 0.8, seed + 3, rng.integers(0, model_cfg.vocab_size, 300))
    return Engine(config, ckpt), reference, skewed


def _survivor_errors(refs, deadline_s):
    start = time.monotonic()
    errors = []
    for ref in refs:
        with pytest.raises(RayTaskError) as info:
            ray.get(ref, timeout=deadline_s)
        errors.append(info.value)
    return errors, time.monotonic() - start


def test_killed_peer_makes_survivors_raise_within_timeout(engine):
    w0, w1, w2 = engine.workers
    # w0 and w1 enter the step's first all_to_all; w2 never does, and is killed.
    refs = [w0.step.remote(StepPlan()), w1.step.remote(StepPlan())]
    ray.kill(w2)
    errors, elapsed = _survivor_errors(refs, TIMEOUT_S + 10)
    assert elapsed < TIMEOUT_S + 5
    for err in errors:
        assert isinstance(err.cause, CollectiveError), err
        assert "all_to_all" in str(err.cause) and engine.group_name in str(err.cause)


def test_silent_peer_makes_survivors_raise_after_timeout(engine):
    w0, w1, _ = engine.workers  # w2 stays alive but never joins the collective
    refs = [w0.step.remote(StepPlan()), w1.step.remote(StepPlan())]
    errors, elapsed = _survivor_errors(refs, TIMEOUT_S + 10)
    assert TIMEOUT_S * 0.5 <= elapsed < TIMEOUT_S + 5
    assert all(isinstance(e.cause, CollectiveError) for e in errors)


def test_engine_step_on_a_dead_worker_raises_worker_lost(engine):
    ray.kill(engine.workers[1])
    start = time.monotonic()
    with pytest.raises((WorkerLost, CollectiveError)):
        engine.step([StepPlan()] * 3)
    assert time.monotonic() - start < TIMEOUT_S + 35


def test_recover_replaces_a_dead_worker_and_serves_on(ray_cluster, tmp_path):
    """After a worker dies: recover() replaces it on the committed placement (replicas and split
    weights included), survivors keep their slots, and the engine again equals the reference and
    can rebalance (the coordinator follows the new epoch)."""
    engine, reference, skewed = replicated_engine(tmp_path, seed=4)
    with engine:
        engine_logits(engine, [skewed])
        assert engine.rebalance(force=True) == 1
        engine_logits(engine, [skewed])  # commits v1 (replicas of the hot experts, split weights)
        assert engine.placement().version == 1 and engine.replica_weights_LS is not None

        ray.kill(engine.workers[1])
        with pytest.raises((WorkerLost, CollectiveError)):
            engine.step([StepPlan()] * 3)
        done = engine.recover()
        assert done["replaced"] == [1] and done["epoch"] == 1 and engine.group_name.endswith("epoch1")

        for ids in (skewed, np.arange(37), np.array([3])):  # one prompt: two idle workers
            assert max_rel_error(engine_logits(engine, [ids])[0], reference_logits(reference, ids)) <= 1e-5
        assert engine.rebalance(force=True) == 2  # stats reach the coordinator under the new epoch
        engine_logits(engine, [skewed])
        assert engine.placement().version == 2
        assert max_rel_error(engine_logits(engine, [skewed])[0], reference_logits(reference, skewed)) <= 1e-5
        assert engine.stats()["placement_version"] == 2


def test_recover_when_a_worker_dies_in_the_step_that_commits_a_migration(ray_cluster, tmp_path):
    """The survivors switch to v+1 at the start of the commit step, then the step fails: recover()
    adopts v+1 for everyone (the replacement loads it), the coordinator records it as committed,
    outputs equal the reference and later rebalances still happen."""
    engine, reference, skewed = replicated_engine(tmp_path, seed=6)
    with engine:
        engine_logits(engine, [skewed])
        assert engine.rebalance(force=True) == 1  # v1 staged on every worker
        ray.kill(engine.workers[2])
        with pytest.raises((WorkerLost, CollectiveError)):
            engine.step([StepPlan()] * 3)  # would have committed v1
        with pytest.raises(WorkerLost, match="recover"):
            engine.step([StepPlan()] * 3)  # refused until recovered
        done = engine.recover()
        assert done["adopted_version"] == 1 and done["replaced"] == [2]
        assert engine.placement().version == 1
        for ids in (skewed, np.arange(50)):
            assert max_rel_error(engine_logits(engine, [ids])[0], reference_logits(reference, ids)) <= 1e-5
        assert engine.stats()["placement_version"] == 1
        assert engine.rebalance(force=True) == 2
        engine_logits(engine, [skewed])
        assert max_rel_error(engine_logits(engine, [skewed])[0], reference_logits(reference, skewed)) <= 1e-5


def test_a_failed_recovery_can_be_retried_and_the_coordinator_follows(ray_cluster, tmp_path):
    """The first recover() fails while re-forming the group (injected: the new group's formation
    raises once); the engine stays unhealthy, a second recover() succeeds, the half-committed
    version is adopted everywhere including the coordinator, and rebalancing still works."""
    engine, reference, skewed = replicated_engine(tmp_path, seed=8)
    with engine:
        engine_logits(engine, [skewed])
        assert engine.rebalance(force=True) == 1
        ray.kill(engine.workers[0])
        with pytest.raises((WorkerLost, CollectiveError)):
            engine.step([StepPlan()] * 3)  # the commit step of v1

        form_group = engine._form_group
        calls = []

        def formation_fails_three_times():  # every round of the first recover() fails
            calls.append(1)
            if len(calls) <= 3:
                raise WorkerLost("injected: group formation failed")
            form_group()

        engine._form_group = formation_fails_three_times
        with pytest.raises(WorkerLost, match="injected"):
            engine.recover()
        assert not engine.healthy
        done = engine.recover()
        assert done["adopted_version"] is None  # adopted by the first attempt already
        assert engine.placement().version == 1 and engine.healthy
        assert engine.recover() is None  # a healthy engine: nothing to do
        assert max_rel_error(engine_logits(engine, [skewed])[0], reference_logits(reference, skewed)) <= 1e-5
        assert engine.stats()["placement_version"] == 1
        assert engine.rebalance(force=True) == 2
        engine_logits(engine, [skewed])
        assert max_rel_error(engine_logits(engine, [skewed])[0], reference_logits(reference, skewed)) <= 1e-5


def test_worker_loops_survive_a_worker_killed_while_a_commit_is_in_flight(ray_cluster, tmp_path):
    """The workers step on their own loops (the default): a placement is staged and its commit
    request sent, then a worker dies. The driver stops the loops, recovers (the commit adopted or
    dropped consistently everywhere), re-runs what was in flight: every output equals the
    reference, the coordinator agrees on the placement, and rebalancing goes on."""
    from moeray.generation.driver import GenerationDriver
    from moeray.generation.reference import greedy_generate
    from moeray.generation.sampling import SamplingParams

    engine, reference, skewed = replicated_engine(tmp_path, seed=10, step_loop="workers")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [skewed[:40].tolist(), [3, 4, 5], skewed[100:117].tolist()]
    with engine:
        driver = GenerationDriver(engine)
        ids = [driver.add_request(p, params) for p in prompts]
        for _ in range(3):
            driver.step()
        assert engine.rebalance(force=True) == 1  # staged; the next driver step sends its commit
        driver.step()
        ray.kill(engine.workers[2])
        outs = driver.run_to_completion(ids)
        assert engine.recoveries and engine.recoveries[-1]["replaced"] == [2]
        for rid, prompt in zip(ids, prompts):
            assert list(outs[rid].outputs[0].token_ids) == greedy_generate(reference, prompt, 12)
        assert engine.stats()["placement_version"] == engine.placement().version
        version = engine.rebalance(force=True)
        assert version is not None and version > 1
        outs = driver.run_to_completion([driver.add_request(skewed[:30].tolist(), params)])
        assert engine.placement().version == version
        assert list(next(iter(outs.values())).outputs[0].token_ids) == greedy_generate(reference, skewed[:30].tolist(), 12)

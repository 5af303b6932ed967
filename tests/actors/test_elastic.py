"""Elastic membership (issue 11): a lost worker shrinks the group at once and a replacement joins
later; experts come back from live replicas before the checkpoint; a dead coordinator is rebuilt
and rebalancing resumes; a stuck rebalance is abandoned and reported. Outputs equal the
single-process reference throughout. (Scaling on request: test_scaling.py; several simulated
nodes: test_multinode.py.)"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import ray

from moeray.generation.reference import greedy_generate
from moeray.generation.sampling import SamplingParams
from moeray.llm import LLM
from tests.helpers import engine_logits, make_checkpoint, max_rel_error, reference_logits

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("elastic"), seed=8, family="mixtral", num_experts=8, top_k=2)


def _prompts(rng, count):
    return [rng.integers(3, 200, int(n)).tolist() for n in rng.integers(1, 30, count)]


def _check(outs, ids, prompts, reference):
    for rid, prompt in zip(ids, prompts):
        assert list(outs[rid].outputs[0].token_ids) == greedy_generate(reference, prompt, PARAMS.max_tokens), rid


def _step_until(driver, condition, what, timeout_s=60.0) -> dict:
    """Step until `condition()`; the final outputs of requests that finished meanwhile, by id."""
    deadline, finished = time.monotonic() + timeout_s, {}
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        finished.update({out.request_id: out for out in driver.step() if out.finished})
        if driver.engine.joiners is not None:
            driver.engine.joiners.wait(0.05)  # an idle driver waits on the joiner, not a sleep
    return finished


def _finish(driver, ids, finished: dict) -> dict:
    return {**finished, **driver.run_to_completion([rid for rid in ids if rid not in finished])}


@pytest.mark.parametrize("step_loop", ["workers", "driver"])
def test_a_lost_worker_shrinks_the_group_and_a_replacement_rejoins(ray_cluster, model, step_loop):
    """Kill a worker with requests in flight: the two survivors go on as a group of 2 at once
    (no request fails, outputs equal the reference, the event says what came from where), then a
    replacement starts on the freed bundle while serving goes on and joins: 3 workers again."""
    ckpt, _, reference = model
    rng = np.random.default_rng(1)
    with LLM(ckpt, num_workers=3, parallel={"collective_timeout_s": 5, "step_loop": step_loop},
             rebalance={"enabled": False}) as llm:
        driver, engine = llm.driver, llm.engine
        prompts = _prompts(rng, 6)
        ids = [driver.add_request(p, PARAMS) for p in prompts]
        for _ in range(3):
            driver.step()
        ray.kill(engine.workers[1])
        outs = driver.run_to_completion(ids)
        _check(outs, ids, prompts, reference)
        shrink = engine.recoveries[-1]
        assert (shrink["mode"], shrink["lost_ranks"], shrink["from_workers"], shrink["to_workers"]) == ("shrink", [1], 3, 2)
        assert shrink["slots_from_checkpoint"] == 2 * 3  # rank 1's 3 experts per layer had no other copy
        assert shrink["requests_rerun"] >= 1 and shrink["recovered_at_s"] >= shrink["detected_at_s"]
        assert engine.target_workers == 3 and engine.placement().num_workers == 2

        more = _prompts(rng, 4)
        more_ids = [driver.add_request(p, PARAMS) for p in more]
        finished = _step_until(driver, lambda: len(engine.workers) == 3, "the replacement to join")
        rejoin = engine.scale_events[-1]
        assert rejoin["joiners_prestarted"] == 1 and (rejoin["from_workers"], rejoin["to_workers"]) == (2, 3)
        # the joiner gets what it lacks from the live workers: nothing is read from the checkpoint
        assert rejoin["slots_read_from_checkpoint"] == 0 and rejoin["slots_from_replicas"] > 0
        _check(_finish(driver, more_ids, finished), more_ids, more, reference)
        assert engine.placement().num_workers == 3 and engine.epoch == 2


def test_experts_of_a_lost_worker_come_back_from_live_replicas(ray_cluster, model):
    """After a rebalance replicated the hot experts, a worker holding replicas dies: the experts it
    shared come from the survivors' copies (the object store), only the rest from the checkpoint,
    and logits still equal the reference."""
    ckpt, cfg, reference = model
    rng = np.random.default_rng(2)
    skewed = np.where(rng.random(300) < 0.8, 11, rng.integers(0, cfg.vocab_size, 300))
    with LLM(ckpt, num_workers=3, redundant_slots_per_worker=1,
             parallel={"collective_timeout_s": 5, "rejoin": False}, rebalance={"enabled": False}) as llm:
        engine = llm.engine
        engine_logits(engine, [skewed])
        assert engine.rebalance(force=True) is not None
        engine_logits(engine, [skewed])  # commits the replicated placement
        p = engine.placement()
        # the worker holding the most experts that also live elsewhere
        shared = [sum(int(p.logcnt[layer, e] > 1) for layer in range(p.num_layers)
                      for e in p.slots_of_worker(w)[layer] if e >= 0) for w in range(p.num_workers)]
        victim = int(np.argmax(shared))
        assert shared[victim] > 0
        ray.kill(engine.workers[victim])
        for ids in (skewed, np.arange(41), np.array([5])):  # the first one meets the dead worker
            assert max_rel_error(engine_logits(engine, [ids])[0], reference_logits(reference, ids)) <= 1e-5
        event = engine.recoveries[-1]
        assert event["mode"] == "shrink" and event["to_workers"] == 2
        assert event["experts_from_replicas"] >= 1
        # what a survivor's replica serves on is not read again: fewer checkpoint reads than lost experts
        assert event["slots_from_checkpoint"] < event["experts_lost"]
        assert engine.target_workers == 2  # rejoin off: the engine stays at the survivors


def test_a_dead_coordinator_is_rebuilt_and_rebalancing_resumes(ray_cluster, model):
    """Kill the coordinator twice: once between requests (the next stats() rebuilds it, the log is
    kept) and once while the worker loops serve with a policy check every step (the failed check
    rebuilds it). Versions never repeat and a forced rebalance commits afterwards."""
    ckpt, _, reference = model
    rng = np.random.default_rng(3)
    with LLM(ckpt, num_workers=2, redundant_slots_per_worker=1, parallel={"collective_timeout_s": 5},
             rebalance={"check_interval_steps": 1, "min_tokens": 10**9}) as llm:
        driver, engine = llm.driver, llm.engine
        prompts = _prompts(rng, 4)
        ids = [driver.add_request(p, PARAMS) for p in prompts]
        _check(driver.run_to_completion(ids), ids, prompts, reference)
        assert engine.rebalance(force=True) == 1
        _check(driver.run_to_completion(ids := [driver.add_request(p, PARAMS) for p in prompts]), ids, prompts, reference)
        assert engine.placement().version == 1

        ray.kill(engine.coordinator)
        stats = engine.stats()
        assert stats["events"][-1]["kind"] == "coordinator_restart"
        assert [r["version"] for r in stats["rebalances"]] == [1]  # the log outlived its coordinator

        ray.kill(engine.coordinator)
        ids = [driver.add_request(p, PARAMS) for p in prompts]
        _check(driver.run_to_completion(ids), ids, prompts, reference)
        _step_until(driver, lambda: sum(e["kind"] == "coordinator_restart" for e in engine.events) == 2,
                    "the policy check to find the dead coordinator")
        version = engine.rebalance(force=True)
        assert version is not None and version > 1
        _check(driver.run_to_completion(ids := [driver.add_request(p, PARAMS) for p in prompts]), ids, prompts, reference)
        assert engine.placement().version == version
        assert engine.rebalance_health()["state"] == "ok"


@ray.remote(num_cpus=0)
class _Gate:
    """A call that never returns: stands in for a prepare phase stuck on a worker's stage."""

    async def wait(self):
        await asyncio.Event().wait()


def test_a_stuck_rebalance_is_abandoned_reported_and_rebalancing_resumes(ray_cluster, model):
    ckpt, _, reference = model
    rng = np.random.default_rng(4)
    with LLM(ckpt, num_workers=2, parallel={"collective_timeout_s": 5},
             rebalance={"stuck_timeout_s": 1.0, "min_tokens": 10**9}) as llm:
        driver, engine = llm.driver, llm.engine
        gate = _Gate.remote()
        engine._tick_ref, engine._tick_started_s = gate.wait.remote(), time.time()
        assert engine.rebalance_health()["stuck_abandoned"] == 0
        prompts = _prompts(rng, 3)
        ids = [driver.add_request(p, PARAMS) for p in prompts]
        _check(driver.run_to_completion(ids), ids, prompts, reference)
        _step_until(driver, lambda: engine.rebalance_health()["stuck_abandoned"] == 1, "the stuck prepare to be abandoned")
        health = engine.rebalance_health()
        assert health["last_stuck"]["phase"] == "prepare" and "stuck_timeout_s=1" in health["last_stuck"]["reason"]
        assert any(e["kind"] == "rebalance_stuck" for e in engine.events)
        assert any("rebalance stuck" in err for err in engine.rebalance_errors)
        version = engine.rebalance(force=True)
        assert version is not None
        _check(driver.run_to_completion(ids := [driver.add_request(p, PARAMS) for p in prompts]), ids, prompts, reference)
        assert engine.placement().version == version
        ray.kill(gate)

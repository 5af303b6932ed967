"""Changing the worker count while requests are in flight (Engine.scale via GenerationDriver.scale):
2 -> 4 -> 3 -> 1 workers with requests joining all along; no request fails, every output equals
the single-process reference, requests on leaving workers are re-run elsewhere, rebalancing and
statistics follow the new count. Both step paths (the workers' own loops and the driver's)."""

from __future__ import annotations

import numpy as np
import pytest

from moeray.generation.reference import greedy_generate
from moeray.generation.sampling import SamplingParams
from moeray.llm import LLM
from tests.helpers import make_checkpoint

PARAMS = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("scale"), seed=5, family="mixtral", num_experts=8, top_k=2)


def _prompts(rng, count):
    return [rng.integers(3, 200, int(n)).tolist() for n in rng.integers(1, 30, count)]


def _why_no_plan(llm) -> tuple:
    stats = llm.stats()
    return (llm.engine.rebalance_errors, stats["last_decision"], stats["window_steps"], float(stats["load_LE"].sum()))


@pytest.mark.parametrize("step_loop", ["workers", "driver"])
def test_scale_up_and_down_while_requests_are_in_flight(ray_cluster, model, step_loop):
    ckpt, cfg, reference = model
    rng = np.random.default_rng(1 if step_loop == "workers" else 2)
    with LLM(ckpt, num_workers=2, redundant_slots_per_worker=1, parallel={"step_loop": step_loop},
             rebalance={"enabled": False}) as llm:
        driver = llm.driver
        submitted = {}

        def submit(count):
            for prompt in _prompts(rng, count):
                submitted[driver.add_request(prompt, PARAMS)] = prompt

        done = {}

        def collect(outputs):
            done.update({o.request_id: o for o in outputs if o.finished})

        def step_until_running(min_running):
            """Step until the scheduler has at least min_running requests admitted (on workers)."""
            for _ in range(200):
                collect(driver.step())
                if len(driver.scheduler.running) >= min_running:
                    return
            raise AssertionError("requests were not admitted")

        submit(3)
        step_until_running(3)
        up = llm.scale(4)
        assert up["to_workers"] == 4 and llm.engine.placement().num_workers == 4 and up["epoch"] == 1
        submit(6)  # these spread over the four workers, so scaling down moves some of them
        step_until_running(6)
        down = llm.scale(3)
        assert down["requests_moved"] >= 1, "no request sat on the leaving worker"
        submit(2)
        collect(driver.step())
        assert llm.scale(1)["to_workers"] == 1
        submit(2)
        pending = [rid for rid in submitted if rid not in done]
        done.update(driver.run_to_completion(pending))
        assert len(done) == len(submitted)  # no request lost
        for rid, prompt in submitted.items():
            assert list(done[rid].outputs[0].token_ids) == greedy_generate(reference, prompt, PARAMS.max_tokens), rid
        events = llm.engine.scale_events
        assert [e["to_workers"] for e in events] == [4, 3, 1]
        versions = [e["placement_version"] for e in events]
        assert versions == sorted(set(versions))  # never reused
        # The coordinator follows the new count: statistics and a forced rebalance work on it.
        assert llm.stats()["placement_version"] == llm.engine.placement().version
        idle_since = llm.engine.steps
        assert llm.scale(2)["to_workers"] == 2
        # Nothing ran meanwhile, so no step was counted: empty lockstep steps while the joiner
        # started once filled the statistics window with zero load (and the rebalance below had none)
        assert llm.engine.steps == idle_since
        # Bundles freed by the scale-downs were reused; the group made for the scale-up went back.
        assert len(llm.engine._pgs) == 1 and not llm.engine._free_bundles
        version = llm.rebalance()
        # None: no plan was staged; the engine and the coordinator keep why
        assert version is not None, _why_no_plan(llm)
        for _ in range(200):  # an idle engine still commits it (the driver's step: exactly one step)
            driver.step()
            if llm.engine.placement().version == version:
                break
        assert llm.engine.placement().version == version
        out = llm.generate([[7, 8, 9]], PARAMS)[0]
        assert list(out.outputs[0].token_ids) == greedy_generate(reference, [7, 8, 9], PARAMS.max_tokens)


def test_scale_refuses_bad_counts_and_changes_nothing(ray_cluster, model):
    ckpt, _, _ = model
    with LLM(ckpt, num_workers=2, parallel={"slots_per_worker": 4}, rebalance={"enabled": False}) as llm:
        with pytest.raises(ValueError, match="num_workers must be an integer >= 1, got 0"):
            llm.scale(0)
        with pytest.raises(ValueError, match=r"num_workers=1 x slots_per_worker=4 = 4 slots < num_experts=8"):
            llm.scale(1)
        assert len(llm.engine.workers) == 2 and llm.engine.epoch == 0
        assert llm.generate([[3, 4]], PARAMS)[0].finished


def test_a_scale_that_fails_part_way_recovers_and_loses_no_request(ray_cluster, model):
    """The new epoch's group fails to form (injected) after the leaving worker was ended: the
    driver records the failure and recovers between steps at the new count, the scale call reports
    it; every request in flight still finishes with the reference output."""
    from moeray.errors import WorkerLost

    ckpt, _, reference = model
    rng = np.random.default_rng(3)
    with LLM(ckpt, num_workers=3, redundant_slots_per_worker=1, rebalance={"enabled": False}) as llm:
        driver, engine = llm.driver, llm.engine
        prompts = _prompts(rng, 5)
        ids = [driver.add_request(p, PARAMS) for p in prompts]
        for _ in range(100):
            driver.step()
            if len(driver.scheduler.running) == len(ids):
                break
        form_group, calls = engine._form_group, []

        def fails_once():
            calls.append(1)
            if len(calls) == 1:
                raise WorkerLost("injected: group formation failed")
            form_group()

        engine._form_group = fails_once
        with pytest.raises(RuntimeError, match="scale to 2 workers failed: WorkerLost: injected"):
            llm.scale(2)
        # the failure was recovered between steps (a scale_failed event, then a recovery)
        assert engine.healthy and len(engine.workers) == 2 and engine.target_workers == 2
        assert [e["kind"] for e in engine.events[-2:]] == ["scale_failed", "recovery"]
        outs = driver.run_to_completion(ids)
        assert engine.healthy and engine.recoveries and len(engine.workers) == 2
        for rid, prompt in zip(ids, prompts):
            assert list(outs[rid].outputs[0].token_ids) == greedy_generate(reference, prompt, PARAMS.max_tokens)

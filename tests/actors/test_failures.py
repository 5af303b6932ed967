"""A dead or silent peer makes the survivors raise within the collective timeout, never hang."""

import time

import numpy as np
import pytest
import ray
from ray.exceptions import RayTaskError

from moeray.config import EngineConfig, ParallelConfig
from moeray.engine import Engine
from moeray.errors import CollectiveError, WorkerLost
from tests.helpers import make_checkpoint

TIMEOUT_S = 3.0


@pytest.fixture
def engine(ray_cluster, tmp_path):
    ckpt, model_cfg, _ = make_checkpoint(tmp_path, seed=2)
    config = EngineConfig(model=model_cfg, parallel=ParallelConfig(num_workers=3, collective_timeout_s=TIMEOUT_S))
    with Engine(config, ckpt) as eng:
        eng.step(np.arange(9))  # the group is formed and has completed a step
        yield eng


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
    refs = [w0.step.remote(np.arange(4)), w1.step.remote(np.arange(4))]
    ray.kill(w2)
    errors, elapsed = _survivor_errors(refs, TIMEOUT_S + 10)
    assert elapsed < TIMEOUT_S + 5
    for err in errors:
        assert isinstance(err.cause, CollectiveError), err
        assert "all_to_all" in str(err.cause) and engine.group_name in str(err.cause)


def test_silent_peer_makes_survivors_raise_after_timeout(engine):
    w0, w1, _ = engine.workers  # w2 stays alive but never joins the collective
    refs = [w0.step.remote(np.arange(4)), w1.step.remote(np.arange(4))]
    errors, elapsed = _survivor_errors(refs, TIMEOUT_S + 10)
    assert TIMEOUT_S * 0.5 <= elapsed < TIMEOUT_S + 5
    assert all(isinstance(e.cause, CollectiveError) for e in errors)


def test_engine_step_on_a_dead_worker_raises_worker_lost(engine):
    ray.kill(engine.workers[1])
    start = time.monotonic()
    with pytest.raises((WorkerLost, CollectiveError)):
        engine.step(np.arange(6))
    assert time.monotonic() - start < TIMEOUT_S + 35

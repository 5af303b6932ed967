"""Trace readers (skipped without ../shared/traces) and the synthetic generator (always)."""

import numpy as np
import pytest

from placement.traces import (
    SyntheticConfig,
    default_traces_dir,
    load_deepseek,
    load_olmoe_mixtral,
    measure,
    noisy,
    real_traces,
    sample_batch_ids,
    synthetic_trace,
)

needs_traces = pytest.mark.skipif(default_traces_dir() is None, reason="no ../shared/traces")


@needs_traces
def test_deepseek_reader_drops_dense_layers():
    trace = load_deepseek()
    assert trace.shape == (58, 256) and len(trace.workloads) == 12
    shape = measure(trace)
    assert 0.5 < shape.log_sigma < 0.9 and 4 < shape.hottest_over_mean < 9


@needs_traces
def test_olmoe_and_mixtral_readers():
    olmoe = load_olmoe_mixtral(model="olmoe")
    assert olmoe.shape == (3, 64) and olmoe.top_k == 8
    for load in olmoe.workloads.values():
        assert np.allclose(load.sum(axis=1), load.sum(axis=1)[0])  # tokens x k per layer
    assert load_olmoe_mixtral(model="mistral").shape == (3, 8)
    assert [t.name for t in real_traces()] == ["deepseek-v3", "olmoe", "mixtral-8x7b"]


def test_missing_directory_gives_no_traces(tmp_path):
    assert real_traces(tmp_path / "nope") == []
    with pytest.raises(FileNotFoundError):
        load_deepseek(tmp_path / "nope")


def test_synthetic_generator_is_calibrated_and_reproducible():
    config = SyntheticConfig(num_layers=20, num_experts=128, num_phases=3, tokens_per_phase=2e5)
    trace = synthetic_trace(config, seed=1)
    again = synthetic_trace(config, seed=1)
    assert trace.shape == (20, 128) and set(trace.workloads) == {"phase0", "phase1", "phase2"}
    assert all(np.array_equal(trace.workloads[k], again.workloads[k]) for k in trace.workloads)
    assert np.allclose([w.sum(axis=1) for w in trace.workloads.values()], 2e5 * 8)
    shape = measure(trace)
    assert 0.55 < shape.log_sigma < 0.85
    assert 0.5 < shape.drift_correlation < 0.9


def test_batches_and_noise():
    rng = np.random.default_rng(0)
    load = np.array([0.0, 1.0, 3.0])
    ids = sample_batch_ids(load, 4000, 2, rng)
    assert ids.shape == (4000, 2) and (ids != 0).all()
    assert 0.7 < (ids == 2).mean() < 0.8
    jitter = noisy(np.full((2, 1000), 100.0), 0.01, rng)
    assert abs(jitter.std() - 1.0) < 0.2 and (jitter >= 0).all()

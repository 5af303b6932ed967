"""placement.cost: the tables equal their fits to the bench JSON, and the model's terms by hand."""

from pathlib import Path

import numpy as np
import pytest

from placement.cost import (
    SHAPES,
    ExpertShape,
    KernelRates,
    LinkRates,
    StepCostModel,
    exchange_rows,
    fit_kernel_rates,
    fit_link_rates,
    kernel_cases,
    predict_kernel_case,
)
from placement.hierarchy import ClusterCostModel
from placement.layout import Topology

BENCH = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"
KERNEL_FILES = [BENCH / "kernel-h200.json", BENCH / "kernel-deepseek-sweep.json"]
needs_benches = pytest.mark.skipif(not all(p.exists() for p in KERNEL_FILES + [BENCH / "exchange.json"]),
                                   reason="bench tables missing")


@needs_benches
def test_tables_are_the_fits_of_the_measured_benches():
    cases = kernel_cases(KERNEL_FILES)
    fitted, table = fit_kernel_rates(cases), KernelRates()
    assert (fitted.flops_per_s, fitted.tile_rows, fitted.weight_bytes_per_s) == (table.flops_per_s, table.tile_rows, table.weight_bytes_per_s)
    assert abs(fitted.floor_s - table.floor_s) < 1e-6
    errors = [abs(predict_kernel_case(c, table) / c.seconds - 1) for c in cases]
    assert np.mean(errors) < 0.06 and max(errors) < 0.2  # what docs/benchmarks/placement.md reports
    links = fit_link_rates(exchange_rows(BENCH / "exchange.json"))
    assert links.intra_node_bytes_per_s == LinkRates().intra_node_bytes_per_s
    assert abs(links.latency_s - LinkRates().latency_s) < 1e-9


def test_compute_by_hand_and_shards_scale_with_width():
    shape = ExpertShape("toy", hidden=4, ffn=8, top_k=2)
    rates = KernelRates(flops_per_s=192.0, tile_rows=2.0, weight_bytes_per_s=96.0, floor_s=0.1)
    model = StepCostModel(shape, rates)
    # flops per row 6*4*8 = 192: a slot of r rows computes (r + 2) s; its weights 192 bytes stream in 2 s
    rows = np.array([[10, 0, 1, 3]])
    assert np.allclose(model.slot_seconds(rows, 1.0), [[12, 0, 3, 5]])
    assert np.allclose(model.compute_seconds(rows, 1.0, 2), [[12, 8]])
    assert np.allclose(model.compute_seconds(rows, np.array([[0.5, 1, 0.25, 1]]), 2), [[6, 5.75]])
    assert np.allclose(model.compute_seconds(np.zeros((1, 2)), 1.0, 2), [[0.1]])  # the launch floor


def test_exchange_by_link_class():
    shape = ExpertShape("toy", hidden=1, ffn=1, top_k=1, act_bytes=1.0)
    links = LinkRates(intra_node_bytes_per_s=1.0, inter_node_bytes_per_s=0.25, latency_s=0.0)
    model = StepCostModel(shape, links=links, dedup_tokens=False)
    pairs = np.array([[8.0, 8.0, 8.0, 8.0]])
    one_node = model.exchange_seconds(pairs, 32, Topology(1, 4, 1))
    assert np.allclose(one_node, 8 * 3 / 4)  # 3/4 of each worker's rows cross its node's links
    two_nodes = model.exchange_seconds(pairs, 32, Topology(2, 2, 1))
    assert np.allclose(two_nodes, max(8 * 1 / 4 / 1.0, 8 * 2 / 4 / 0.25))  # the slower inter-node half
    configured = model.exchange_seconds(pairs, 32, Topology(2, 2, 1, inter_node_gbps=1e-9))  # 1 byte/s
    assert np.allclose(configured, max(8 / 4, 8 * 2 / 4 / 1.0))
    hot = model.exchange_seconds(np.array([[20.0, 4.0, 4.0, 4.0]]), 32, Topology(1, 4, 1))
    # worker 0 receives 20 * 3/4; worker 1 receives 3 but sends the others their share of their rows: 28 / 4
    assert np.allclose(hot, [[15, 7, 7, 7]])


def test_token_dedup_bounds():
    model = StepCostModel(SHAPES["deepseek-v3"])
    tokens = 256
    rows = model.received_rows(np.array([[0.0, 1.0, 64.0, tokens * 8.0]]), tokens)
    assert rows[0, 0] == 0 and rows[0, 1] <= 1 and rows[0, 2] <= 64
    assert np.isclose(rows[0, 3], tokens)  # full sharding: every token, once
    assert np.allclose(StepCostModel(SHAPES["olmoe"], dedup_tokens=False).received_rows(np.array([[5.0]]), 10), 5)


def test_layer_time_is_phase_by_phase():
    compute = np.array([[1.0, 3.0]])
    exchange = np.array([[2.0, 0.5]])
    assert StepCostModel.layer_seconds(compute, exchange)[0] == 3.0 + 2 * 2.0
    assert StepCostModel.mean_worker_seconds(compute, exchange)[0] == 2.0 + 2 * 1.25


def test_memory_counts_shard_widths():
    model = StepCostModel(ExpertShape("toy", 2, 2, 1, weight_bytes=1.0))  # 12 bytes per expert
    assert np.allclose(model.memory_bytes(np.array([[1, 0.5, 0.25, 0]]), 2), [[18, 3]])


def test_hierarchy_inputs_from_the_measured_model():
    topo = Topology(4, 8, 9, inter_node_gbps=25.0)
    measured = ClusterCostModel.measured(SHAPES["deepseek-v3"], topo, tokens_per_step=4096)
    assert measured.inter_node_gbps == 25.0 and measured.token_bytes == 7168 * 2
    assert np.isclose(measured.expert_us_per_token, 6 * 7168 * 2048 / KernelRates().flops_per_s * 1e6)
    assert ClusterCostModel.measured(SHAPES["olmoe"], Topology(2, 8, 5), 64).inter_node_gbps == 45.0


@needs_benches
def test_whole_measured_layers_are_predicted_within_a_few_percent():
    from placement.bench_batch import layer_bench_check
    from placement.traces import default_traces_dir, real_traces

    if default_traces_dir() is None or not (BENCH / "layer.json").exists():
        pytest.skip("needs ../shared/traces and docs/benchmarks/layer.json")
    rows = layer_bench_check(BENCH, real_traces())
    errors = np.array([row["predicted_ms"] / row["measured_ms"] - 1 for row in rows])
    assert len(rows) >= 24 and np.abs(errors).mean() < 0.05 and np.abs(errors).max() < 0.12

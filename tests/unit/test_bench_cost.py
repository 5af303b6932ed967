"""`moeray bench cost` and placement.cost_fit: the fits recover known rates from cases timed by the
model's own formula (exactly, and within a few percent under 3% log-normal noise); the model's new
terms (per-slot seconds, shared cores, host work, the counts' latency) by hand; a quick CPU run of
every part end to end writes the JSON the docs read (docs/benchmarks/cost-model.md)."""

import argparse
import json
import math

import numpy as np
import pytest

from placement.cost import ExpertShape, HostRates, KernelRates, LinkRates, StepCostModel
from placement.cost_fit import (
    SlotCase,
    fit_host_rates_to,
    fit_kernel_rates_to,
    fit_link_rates_to,
    log_errors,
    predict_exchange_ranks,
    predict_slot_case,
)
from placement.layout import Topology

NOISE = 0.03  # log-normal sigma of the noisy fits


def _noise(values, sigma: float, seed: int) -> np.ndarray:
    return np.asarray(values) * np.exp(sigma * np.random.default_rng(seed).standard_normal(len(values)))


def _synthetic_cases(rates: KernelRates, hidden: int, ffn: int, weight_bytes: float, sigma: float = 0.0) -> list[SlotCase]:
    """Uniform grid cases (whole and half / quarter shards), uneven rows with shard widths, timed by the model."""
    slots = 16
    shapes = [([r] * t + [0] * (slots - t), [w] * slots) for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
              for t in (1, 4, 16) for w in (1.0, 1 / 2, 1 / 4)]
    rng = np.random.default_rng(0)
    for _ in range(8):
        shapes.append((rng.integers(0, 300, slots).tolist(), rng.choice([1.0, 1 / 2, 1 / 3], slots).tolist()))
    timed = [predict_slot_case(SlotCase("synthetic", tuple(r), tuple(w), hidden, ffn, 1.0, weight_bytes), rates)
             for r, w in shapes]
    timed = _noise(timed, sigma, 1) if sigma else timed
    return [SlotCase("synthetic", tuple(r), tuple(w), hidden, ffn, float(t), weight_bytes) for (r, w), t in zip(shapes, timed)]


KERNEL_RATES = [
    (KernelRates(80e9, 5.0, 10e9, 300e-6, slot_s=100e-6), 512, 256, 4.0),  # CPU scale: a host loop's per-slot cost
    (KernelRates(), 2048, 1024, 2.0),  # the H200 table (bf16, hundreds of TFLOP/s), no per-slot term
    (KernelRates(2e12, 16.0, 5e10, 20e-6, slot_s=3e-6), 256, 128, 2.0),
]


@pytest.mark.parametrize("rates, hidden, ffn, weight_bytes", KERNEL_RATES)
def test_kernel_fit_recovers_known_rates_at_any_scale(rates, hidden, ffn, weight_bytes):
    cases = _synthetic_cases(rates, hidden, ffn, weight_bytes)
    fitted = fit_kernel_rates_to(cases)
    assert fitted.flops_per_s == pytest.approx(rates.flops_per_s, rel=0.02)
    assert fitted.tile_rows == pytest.approx(rates.tile_rows, rel=0.05, abs=0.5)
    assert fitted.weight_bytes_per_s == pytest.approx(rates.weight_bytes_per_s, rel=0.03)
    assert fitted.floor_s == pytest.approx(rates.floor_s, rel=0.03)
    assert fitted.slot_s == pytest.approx(rates.slot_s, rel=0.05, abs=0.02 * rates.floor_s)
    errors = log_errors([predict_slot_case(c, fitted) for c in cases], [c.seconds for c in cases])
    assert errors["mean_abs_log"] < 0.01 and errors["count"] == len(cases)


@pytest.mark.parametrize("rates, hidden, ffn, weight_bytes", KERNEL_RATES[:1])
def test_kernel_fit_under_noise_predicts_held_out_cases(rates, hidden, ffn, weight_bytes):
    cases = _synthetic_cases(rates, hidden, ffn, weight_bytes, sigma=NOISE)
    fitted = fit_kernel_rates_to(cases[0::2])
    assert fitted.flops_per_s == pytest.approx(rates.flops_per_s, rel=0.1)
    assert fitted.slot_s == pytest.approx(rates.slot_s, rel=0.15)
    truth = [predict_slot_case(c, rates) for c in cases[1::2]]
    assert log_errors([predict_slot_case(c, fitted) for c in cases[1::2]], truth)["mean_abs_log"] < NOISE
    # the held-out error against the noisy times is about the noise itself, not more
    assert log_errors([predict_slot_case(c, fitted) for c in cases[1::2]], [c.seconds for c in cases[1::2]])[
        "mean_abs_log"] < 1.5 * NOISE


def test_kernel_fit_keeps_given_floor_and_slot_seconds():
    rates = KernelRates(80e9, 5.0, 10e9, 300e-6, slot_s=100e-6)
    fitted = fit_kernel_rates_to(_synthetic_cases(rates, 512, 256, 4.0), floor_s=300e-6, slot_s=100e-6)
    assert (fitted.floor_s, fitted.slot_s) == (300e-6, 100e-6) and fitted.flops_per_s == pytest.approx(80e9, rel=0.02)


def test_slot_seconds_are_not_scaled_by_width():
    shape = ExpertShape("toy", hidden=4, ffn=8, top_k=2)
    model = StepCostModel(shape, KernelRates(192.0, 2.0, 96.0, 0.1, slot_s=1.5))
    # (rows + 2) s of flops at width 1 (see test_placement_cost), times the width, + 1.5 s per touched slot
    assert np.allclose(model.slot_seconds(np.array([[10, 0, 1]]), np.array([[0.5, 1, 0.25]])), [[7.5, 0, 2.25]])


@pytest.mark.parametrize("rates", [LinkRates(3e9, 45e9, 150e-6), LinkRates(297e9, 45e9, 23e-6)])
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_link_fit_recovers_known_rates(rates, num_ranks):
    rows = [(float(4096 << i), predict_exchange_ranks(4096 << i, rates, num_ranks)) for i in range(0, 18, 2)]
    fitted = fit_link_rates_to(rows, num_ranks)
    assert fitted.intra_node_bytes_per_s == pytest.approx(rates.intra_node_bytes_per_s, rel=0.02)
    assert fitted.latency_s == pytest.approx(rates.latency_s, rel=0.02)
    noisy = list(zip([b for b, _ in rows], _noise([t for _, t in rows], NOISE, 2)))
    fitted = fit_link_rates_to(noisy, num_ranks)
    assert fitted.intra_node_bytes_per_s == pytest.approx(rates.intra_node_bytes_per_s, rel=0.1)
    assert fitted.latency_s == pytest.approx(rates.latency_s, rel=0.1)
    assert predict_exchange_ranks(1 << 20, rates, 4) > predict_exchange_ranks(1 << 20, rates, 2)  # more leaves the rank


def test_host_fit_recovers_fixed_and_per_row_seconds():
    rows_X = [384.0, 768.0, 1536.0, 3072.0, 6144.0]
    exact = [(r, 400e-6 + 2.2e-6 * r) for r in rows_X]
    fitted = fit_host_rates_to(exact)
    assert fitted.fixed_s == pytest.approx(400e-6, rel=0.02) and fitted.per_row_s == pytest.approx(2.2e-6, rel=0.01)
    fitted = fit_host_rates_to(list(zip(rows_X, _noise([t for _, t in exact], NOISE, 3))))
    assert fitted.per_row_s == pytest.approx(2.2e-6, rel=0.1)


def test_log_errors_by_hand():
    e = log_errors([2.0, 1.0], [1.0, 1.0])
    assert e["mean_abs_log"] == pytest.approx(math.log(2) / 2) and e["max_abs_log"] == pytest.approx(math.log(2))
    assert e["mape"] == pytest.approx(0.5)
    assert log_errors([0.5], [1.0])["mean_abs_log"] == pytest.approx(math.log(2))  # symmetric in the ratio
    assert log_errors([], [])["count"] == 0


def test_shared_cores_are_processor_sharing():
    model = StepCostModel(ExpertShape("toy", 1, 1, 1), parallel_workers=2)
    # 3 workers on 2 cores: all at 2/3 speed until the two short ones end at 1.5 s, then the long one alone
    assert np.allclose(model.shared_seconds(np.array([[3.0, 1.0, 1.0]]), 3), [[3.5, 1.5, 1.5]])
    assert np.allclose(model.shared_seconds(np.ones((1, 4)), 4), 2.0)  # 4 equal workers on 2 cores: twice as long
    assert np.allclose(model.shared_seconds(np.ones((1, 4)), 2), 1.0)  # 2 nodes of 2 workers: each has its cores
    alone = StepCostModel(ExpertShape("toy", 1, 1, 1))
    assert np.allclose(alone.shared_seconds(np.ones((1, 4)), 4), 1.0)  # None: every worker its own device


def test_layer_phases_by_hand():
    shape = ExpertShape("toy", hidden=4, ffn=8, top_k=1, act_bytes=1.0)
    kernel = KernelRates(192.0, 0.0, 1e12, 0.0)  # 1 s per row, streaming free
    links = LinkRates(intra_node_bytes_per_s=4.0, inter_node_bytes_per_s=1.0, latency_s=0.5)
    host = HostRates(fixed_s=0.25, per_row_s=0.125)
    model = StepCostModel(shape, kernel, links, dedup_tokens=False, host=host, parallel_workers=1)
    rows_XS = np.array([[4.0, 0.0, 2.0, 2.0]])  # worker 0: 4 rows, worker 1: 4 rows, 2 slots each
    phases = model.layer_phases(rows_XS, 1.0, 2, tokens=8, topology=Topology.flat(2, 2))
    assert phases["compute"][0] == pytest.approx(8.0)  # 4 s each, one core for both: 8 s
    # each receives 4 rows (1 byte x 4 hidden = 4 bytes a row), half from the other worker: 8 bytes / 4 B/s
    assert phases["exchange"][0] == pytest.approx(0.5 + 2 * (0.5 + 2.0))
    assert phases["host"][0] == pytest.approx(0.25 + 0.125 * 4)
    assert phases["total"][0] == pytest.approx(8.0 + 5.5 + 0.75)
    bare = model.layer_seconds(model.compute_seconds(rows_XS, 1.0, 2), model.exchange_seconds(np.array([[4.0, 4.0]]), 8,
                                                                                              Topology.flat(2, 2)))
    assert bare[0] == pytest.approx(4.0 + 2 * 2.5)  # the planner's layer: no sharing, host or counts latency


def _tiny_traces(tmp_path):
    rng = np.random.default_rng(0)
    load = {"top_k": (rng.lognormal(0.0, 0.8, (3, 64)) * 100).round().tolist()}
    data = {"models": {"olmoe": {"top_k": 8, "domains": {"arxiv": load}}}}
    (tmp_path / "olmoe_mixtral_domain_expert_counts.json").write_text(json.dumps(data))
    return tmp_path


def test_quick_cpu_run_of_every_part_writes_the_documented_json(tmp_path):
    from moeray.bench import cost

    parser = argparse.ArgumentParser()
    cost.add_arguments(parser)
    out = tmp_path / "cost.json"
    args = parser.parse_args(["--quick", "--hidden", "64", "--ffn", "32", "--reps", "3", "--iters", "2", "--tokens", "16",
                              "--workers", "2", "--flush-mib", "1", "--traces", str(_tiny_traces(tmp_path)),
                              "--exchange-json", str(tmp_path / "none.json"), "--out", str(out)])
    result = json.loads(out.read_text()) if cost.run(args) else None
    assert result["benchmark"] == "cost" and result["device"] == "cpu" and result["cores_shared_by_workers"] >= 1
    rates = result["kernel"]["rates"]
    for key in ("flops_per_s", "tile_rows", "weight_bytes_per_s", "floor_s", "slot_s"):
        assert math.isfinite(rates[key]) and rates[key] >= 0
    assert result["kernel"]["calibration"] and result["kernel"]["held_out"]
    for row in result["kernel"]["calibration"] + result["kernel"]["held_out"]:
        assert row["measured_s"] > 0 and row["predicted_s"] > 0 and math.isfinite(row["predicted_s"])
        assert row["impl"] == "reference" and len(row["rows_S"]) == len(row["width_S"])
    calibrated = {row["name"] for row in result["kernel"]["calibration"]}
    assert not calibrated & {row["name"] for row in result["kernel"]["held_out"]}  # held out means held out
    assert any(0 < w < 1 for row in result["kernel"]["held_out"] for w in row["width_S"])
    assert any(0 < w < 1 for row in result["kernel"]["calibration"] for w in row["width_S"])
    exchange = result["exchange"]["cpu_gloo_W2"]
    assert exchange["ranks"] == 2 and {r["fitted"] for r in exchange["rows"]} == {True, False}
    assert "h200_json" not in result["exchange"]  # no committed table given: none reported
    layer = result["layer"]
    assert layer["parallel_workers"] == result["cores_shared_by_workers"] / 1
    assert layer["host"]["W2"]["host_rates"]["per_row_s"] > 0 and layer["host"]["W2"]["host_calibration"]
    assert layer["rows"] and {r["workers"] for r in layer["rows"]} == {2}
    for row in layer["rows"]:
        parts = row["predicted_compute_s"] + row["predicted_exchange_s"] + row["predicted_host_s"]
        assert row["predicted_s"] == pytest.approx(parts) and row["predicted_bare_s"] > 0
        for key in ("measured_s", "measured_compute_s", "measured_rest_s", "measured_exchange_s", "measured_host_s"):
            assert row[key] > 0
        assert row["measured_s"] >= row["measured_compute_s"] and len(row["measured_rank_step_s"]) == 2
        assert row["measured_s"] >= max(row["measured_rank_step_s"]) * 0.999  # per iteration the slowest rank
    for key in ("kernel held out: all", "kernel held out: sharded (width < 1)", "exchange gloo W=2 held out",
                "host gloo W=2 calibration (in-sample)", "layer W=2", "layer W=2: vs slowest rank's median step", "layer W=2: compute phase",
                "layer W=2: rest (exchange + host)", "layer W=2: exchange phases", "layer W=2: host phases",
                "layer W=2: bare layer_seconds"):
        summary = result["errors"][key]
        assert summary["count"] > 0 and all(math.isfinite(summary[k]) and summary[k] >= 0
                                            for k in ("mean_abs_log", "max_abs_log", "mape")), key


def test_kernel_only_run_skips_the_other_parts(tmp_path):
    from moeray.bench import cost

    parser = argparse.ArgumentParser()
    cost.add_arguments(parser)
    args = parser.parse_args(["--quick", "--parts", "kernel", "--hidden", "64", "--ffn", "32", "--reps", "3",
                              "--flush-mib", "1", "--traces", str(tmp_path / "missing")])
    result = cost.run(args)
    assert result["kernel"]["held_out"] and "layer" not in result and "exchange" not in result
    assert not any(r["name"].startswith("trace") for r in result["kernel"]["held_out"])  # no traces: none

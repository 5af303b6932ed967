"""`moeray bench tier` end to end on the CPU (--device cpu --small: the code paths, not speed)
over a synthetic trace in the real one's format, with fixed rates (measured ones on a loaded CPU
swing by 10x, and the tier policy's gain check with them): each cold path serves as it says, the
live modes swap, a mode the bench does not know is refused by name."""

from __future__ import annotations

import json

import pytest

from moeray.cli import main
from placement.tiering import TierRates
from placement.traces import OLMOE_MIXTRAL_FILE, SyntheticConfig, synthetic_trace

# OLMoE / 16 (D 128, F 64, bf16: 48 KiB an expert): a copy costs 50 host rows, so fetches dominate
# a step and promoting the hot experts pays
RATES = TierRates(device_row_s=1e-7, host_row_s=2e-6, pcie_bytes_per_s=5e8, expert_bytes=49152.0, row_bytes=256.0,
                  device_floor_s=1e-5, host_expert_s=2e-5)


def write_synthetic_trace(directory, experts: int = 64, layers: int = 3) -> None:
    """placement.traces.synthetic_trace's log-normal counts (its four phases as the bench's four
    default domains), written in the format load_olmoe_mixtral reads."""
    trace = synthetic_trace(SyntheticConfig(num_layers=layers, num_experts=experts, tokens_per_phase=1e4), seed=0)
    domains = {domain: {"top_k": load_LE.tolist()}
               for domain, load_LE in zip(("arxiv", "github", "book", "wikipedia"), trace.workloads.values())}
    (directory / OLMOE_MIXTRAL_FILE).write_text(json.dumps({"models": {"olmoe": {"top_k": 8, "domains": domains}}}))


def test_bench_tier_runs_every_cold_path_and_the_live_modes_swap(tmp_path, monkeypatch):
    monkeypatch.setattr("moeray.tier_measure.measure_rates", lambda *args, **kwargs: RATES)
    write_synthetic_trace(tmp_path)
    out = tmp_path / "tier.json"
    assert main(["bench", "tier", "--device", "cpu", "--small", "--shapes", "olmoe", "--traces", str(tmp_path),
                 "--budgets", "0.25", "--decode-tokens", "4", "--decode-steps", "6", "--prefill-tokens", "48",
                 "--prefill-steps", "2", "--check-every", "2", "--modes", "all,fetch,host,ours_no_prefetch,fetch_live",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["budget"], r["phase"], r["workload"], r["mode"]): r for r in result["shapes"][0]["results"]}
    for phase in ("decode", "prefill"):
        for workload in ("stationary", "drifting"):
            assert rows[(64, phase, workload, "all")]["tokens_per_s"] > 0
            fetch, host = rows[(16, phase, workload, "fetch")], rows[(16, phase, workload, "host")]
            ours, fetch_live = rows[(16, phase, workload, "ours_no_prefetch")], rows[(16, phase, workload, "fetch_live")]
            assert fetch["host_experts_per_layer_step"] == 0 < fetch["fetched_experts_per_layer_step"]
            assert host["fetched_experts_per_layer_step"] == 0 < host["host_experts_per_layer_step"]
            assert fetch_live["host_experts_per_layer_step"] == 0 and "swaps" not in fetch
            assert len(ours["split_bias"]) == 3 and "split_bias" not in fetch_live  # one a trace layer
    # from checkpoint order, the live modes promote the trace's hot experts
    assert rows[(16, "decode", "stationary", "fetch_live")]["swaps"] > 0
    assert rows[(16, "decode", "stationary", "ours_no_prefetch")]["swaps"] > 0
    summary = [r for r in result["summary"] if r["budget"] == 16]
    assert len(summary) == 4 and all(r["fetch_live"] > 0 and r["ours_no_prefetch_over_all"] > 0 for r in summary)


def test_bench_tier_refuses_an_unknown_mode_by_name():
    with pytest.raises(SystemExit, match="ours_typo"):
        main(["bench", "tier", "--device", "cpu", "--small", "--modes", "fetch,ours_typo"])

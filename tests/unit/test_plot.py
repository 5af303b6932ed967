"""The placement report from a coordinator's view (and without one), read back from JSON, drawn as
PNGs and shown as tables. The same from a real engine: tests/actors/test_observe.py."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from matplotlib.image import imread

from moeray.plot import plot_report
from moeray.serving.placement_report import ReportError, assemble_report, read_report
from moeray.status import render_status
from placement import Placement
from tests.unit.test_metrics import E, L, W, rebalanced_core

MODEL = {"name": "tiny-test", "architecture": "Qwen3MoeForCausalLM", "family": "qwen3_moe", "num_moe_layers": L,
         "num_experts": E, "top_k": 2}
STATE = {"epoch": 0, "steps": 16, "recoveries": [], "rebalance_errors": []}
PLOTS = ("expert-load.png", "worker-load.png", "imbalance-timeline.png", "placement-overview.png")


def report_with_rebalance() -> dict:
    core = rebalanced_core()
    return assemble_report(MODEL, core.placement, core.view(True), None, STATE)


def assert_png(path, min_width=500, min_height=300):
    """A decodable PNG of a sane size that is not one flat colour."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert min_width <= width <= 4000 and min_height <= height <= 4000, (path, width, height)
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width) and pixels[..., :3].std() > 0.05, f"{path} looks blank"


def test_report_holds_the_placement_the_load_and_the_rebalance_before_and_after(tmp_path):
    report = report_with_rebalance()
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(report))  # JSON-able: plain lists and numbers only
    back = read_report(path)
    assert back["placement_version"] == 1 and back["num_workers"] == W and len(back["layers"]) == L
    layer = back["layers"][0]
    assert layer["replicas"][0] > 1, "the hot expert got replicas"
    assert layer["expert_load"][0] == max(layer["expert_load"]) and len(layer["worker_load"]) == W
    last = back["last_rebalance"]
    assert last["version"] == 1 and last["committed_at_step"] == 8 and last["before_version"] == 0
    assert last["before_steps"] == 8 and last["after_steps"] == 8
    before, after = np.array(last["before_worker_load"]), np.array(last["after_worker_load"])
    assert before.shape == after.shape == (L, W)
    assert (before.max(axis=1) / before.mean(axis=1)).mean() > last["realised_after"] >= 1.0
    timeline = back["timeline"]
    assert timeline["step_hi"] == [4, 8, 12, 16] and timeline["version"] == [0, 0, 1, 1]
    assert timeline["imbalance_mean"][0] > 2 > timeline["imbalance_mean"][-1]
    assert back["realised_imbalance_mean"] == pytest.approx(timeline["imbalance_mean"][-1])
    # the window (8 steps = 2 ranges) ending at each range: range 0 alone, then pairs of ranges
    window = timeline["window_imbalance_mean"]
    assert timeline["window_steps"] == 8 and window[0] == pytest.approx(timeline["imbalance_mean"][0])
    assert window[-1] == pytest.approx(back["realised_imbalance_mean"])  # ranges 12-16 and 8-12, both on v1
    assert timeline["imbalance_mean"][-1] < window[2] < timeline["imbalance_mean"][1]  # mixes v0 and v1


def test_plots_from_a_saved_report_are_readable_pngs(tmp_path):
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(report_with_rebalance()))
    written = plot_report(read_report(path), tmp_path / "plots")
    assert [p.name for p in written] == list(PLOTS)
    for p in written:
        assert_png(p)


def test_a_report_without_a_coordinator_still_plots_and_prints(tmp_path):
    load_LE = np.arange(L * E, dtype=np.int64).reshape(L, E)
    report = assemble_report(MODEL, Placement.contiguous(L, E, W, 3), None, load_LE, STATE)
    assert report["load_source"] == "since_start" and report["timeline"] is None and report["rebalances"] == []
    assert report["imbalance_worst"] > 1.0
    for p in plot_report(report, tmp_path):
        assert_png(p)
    text = render_status(report)
    assert "without a coordinator" in text


def test_status_table_has_a_row_per_layer_and_the_rebalance_log():
    report = report_with_rebalance()
    lines = render_status(report).splitlines()
    assert "tiny-test (Qwen3MoeForCausalLM): placement v1" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    rows = lines[header + 2:header + 2 + L]
    assert [row.split()[0] for row in rows] == [str(layer) for layer in range(L)]
    assert all("e0 " in row and "x" in row for row in rows), "the hot expert and its replicas are shown"
    log = next(line for line in lines if line.startswith("v1 "))
    record = report["rebalances"][0]
    assert f"{record['predicted_before']:.2f}" in log and str(record["slots_moved"]) in log and "forced" in log


def test_status_names_the_host_tier_and_where_its_rows_ran(tmp_path):
    from moeray.tier_config import HostTierConfig
    from moeray.tier_control import TierControl

    core = rebalanced_core()
    assert "host tier" not in render_status(assemble_report(MODEL, core.placement, core.view(True), None, STATE))
    core.tiers = TierControl(HostTierConfig(device_slots=1, cold_path="auto"), core.placement.slots_per_worker)
    text = render_status(assemble_report(MODEL, core.placement, core.view(True), None, STATE))
    assert "host tier: 1 device + 2 host slots" in text and "rows of host-slot experts" not in text  # none yet
    for worker, (host_rows, fetched_rows) in enumerate([(10, 20), (30, 40)]):
        core.tiers.observe(worker, {"host_rows": host_rows, "fetched_rows": fetched_rows, "host_experts": 1,
                                    "fetched_experts": 2, "host_s": 1.5, "copied_bytes": 2e9})
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(assemble_report(MODEL, core.placement, core.view(True), None, STATE)))
    report = read_report(path)  # as `moeray status --file` reads it: ranks are JSON strings there
    assert report["tier"]["counts_by_worker"]["1"]["host_rows"] == 30
    line = next(line for line in render_status(report).splitlines() if line.startswith("host tier"))
    assert "1 device + 2 host slots" in line and "cold path auto, tiering live" in line, line
    assert "40% computed on the host, 60% fetched (4.0 GB copied), host math 3.0 s" in line, line


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"model": {}}', "missing placement_version"),
])
def test_a_file_that_is_not_a_report_is_named_in_one_line(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(ReportError, match=message) as info:
        read_report(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ReportError, match="no such file"):
        read_report(tmp_path / "missing.json")

"""The placement report: what `GET /v1/placement` answers and `moeray status` / `moeray plot` read.

    report = placement_report(engine)          # a JSON-able dict (plain lists, floats, ints)
    report = read_report("placement.json")     # a saved one, checked

Per MoE layer: the slot map (phy2log), the load per expert over the coordinator's window, the
load per worker that gives under the current placement, and two imbalances (max / mean worker
load; 1.0 is even): `imbalance` is the current placement applied to the windowed load,
`realised_imbalance` is measured from the rows every worker actually computed over the window.
Plus the rebalance log (predicted before / after vs realised after), the realised rows per worker
before and after the last rebalance, and a timeline of realised imbalance per snapshot range.
Without a coordinator (stats disabled) the load is the workers' counts since start-up and there
is no log or timeline.

The coordinator's data is as of the last snapshot it has (workers ship every
`stats.snapshot_interval_steps` steps and at each commit).

Legend: L MoE layers, E experts, S slots, W workers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from placement.layout import expert_counts
from placement.metrics import imbalance_of_worker_loads, surviving_load_after_worker_loss, worker_loads

SCHEMA = 1
_REQUIRED_KEYS = ("model", "placement_version", "num_workers", "slots_per_worker", "num_experts", "layers")


class ReportError(ValueError):
    """A file or answer that is not a placement report."""


def placement_report(engine, model_name: str | None = None) -> dict:
    """The report of a running engine (call it between steps, e.g. on the engine-loop thread).
    `model_name` defaults to the checkpoint directory's name."""
    from moeray.metrics import fetch_coordinator_view

    view = fetch_coordinator_view(engine, True)
    model = engine.config.model
    return assemble_report(
        model={"name": model_name or os.path.basename(os.path.normpath(engine.checkpoint_dir)),
               "architecture": model.architecture, "family": model.family, "num_moe_layers": model.num_moe_layers,
               "num_experts": model.num_experts, "top_k": model.top_k},
        placement=engine.placement(),
        view=view, load_since_start_LE=engine.load() if view is None else None,
        engine_state={"epoch": engine.epoch, "steps": engine.steps, "target_workers": engine.target_workers,
                      "workers_joining": 0 if engine.joiners is None else len(engine.joiners.workers),
                      # membership changes and coordinator rebuilds, oldest first (Engine.events)
                      "events": engine.events[-50:], "recoveries": engine.recoveries[-20:],
                      "rebalance_health": engine.rebalance_health(),
                      "rebalance_errors": engine.rebalance_errors[-20:]})


def assemble_report(model: dict, placement, view: dict | None, load_since_start_LE: np.ndarray | None,
                    engine_state: dict) -> dict:
    """The report from its parts (no Ray here): the committed placement (its split weights and
    shard widths included), the coordinator's view (CoordinatorCore.view with timeline) or,
    without a coordinator, the load since start-up."""
    p = placement
    if view is not None:
        load_LE = np.asarray(view["load_LE"], dtype=np.float64)
        worker_LW = np.asarray(view["worker_load_LW"], dtype=np.float64)
        imbalance_L = np.asarray(view["imbalance_per_layer"], dtype=np.float64)
        realised = view["realised_imbalance_per_layer"]
        realised_L = None if realised is None else np.asarray(realised, dtype=np.float64)
    else:
        load_LE = np.asarray(load_since_start_LE, dtype=np.float64)
        worker_LW = worker_loads(load_LE, p.phy2log, p.slots_per_worker, p.replica_weights, p.shard_width)
        imbalance_L = imbalance_of_worker_loads(worker_LW)
        realised_L = None
    replicas_LE = expert_counts(p.phy2log, p.num_experts)
    surviving_W = surviving_load_after_worker_loss(load_LE, p)
    layers = [{
        "layer": layer,
        "phy2log": p.phy2log[layer].tolist(),
        "replicas": replicas_LE[layer].tolist(),
        "expert_load": load_LE[layer].tolist(),
        "worker_load": worker_LW[layer].tolist(),
        "imbalance": float(imbalance_L[layer]),
        "realised_imbalance": None if realised_L is None else float(realised_L[layer]),
    } for layer in range(p.num_layers)]
    report = {
        "schema": SCHEMA,
        "model": model,
        "placement_version": p.version,
        "num_layers": p.num_layers,
        "num_experts": p.num_experts,
        "num_workers": p.num_workers,
        "slots_per_worker": p.slots_per_worker,
        **engine_state,
        "load_source": "window" if view is not None else "since_start",
        "window_steps": None if view is None else view["window_steps"],
        "layers": layers,
        "imbalance_mean": float(imbalance_L.mean()),
        "imbalance_worst": float(imbalance_L.max()),
        # Fault tolerance of the placement: the share of this load whose expert keeps a live copy
        # when worker w is lost (the rest would come back from the checkpoint).
        "surviving_load_after_worker_loss": surviving_W.tolist(),
        "realised_imbalance_mean": None if realised_L is None else float(realised_L.mean()),
        "realised_imbalance_worst": None if realised_L is None else float(realised_L.max()),
        "rebalances": [] if view is None else view["rebalances"],
        "last_rebalance": None if view is None else _last_rebalance(view),
        "timeline": None if view is None else view["timeline"],
        "drifts_detected": [] if view is None else view["drifts_detected"],
        "last_decision": None if view is None else view["last_decision"],
        "in_flight_version": None if view is None else view["in_flight_version"],
        "planner": None if view is None else view.get("planner"),  # configured, topology, last one run and why
        # the host tier: slots per tier, cold path, measured rates, each worker's rows by path
        "tier": None if view is None else view.get("tier"),
        "generated_at": time.time(),
    }
    return _jsonable(report)


def _last_rebalance(view: dict) -> dict | None:
    """The last committed rebalance: its log entry and the realised rows per worker [L][W]
    before and after it."""
    rows = view.get("last_rebalance_rows")
    if rows is None:
        return None
    record = next(r for r in reversed(view["rebalances"]) if r["version"] == rows["version"])
    return {
        **{key: record[key] for key in ("version", "committed_at_step", "predicted_before", "predicted_after",
                                        "realised_after", "slots_moved", "bytes_moved")},
        "before_version": rows["before_version"],
        "before_worker_load": rows["before_LW"], "before_steps": rows["before_steps"],
        "after_worker_load": rows["after_LW"], "after_steps": rows["after_steps"],
    }


def _jsonable(value):
    """Plain Python containers and numbers all the way down (numpy in the coordinator's log)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def check_report(report) -> dict:
    """`report` if it looks like a placement report, else ReportError saying what is missing."""
    if not isinstance(report, dict):
        raise ReportError(f"a placement report is a JSON object, got {type(report).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in report]
    if missing:
        raise ReportError(f"not a moeray placement report (GET /v1/placement): missing {', '.join(missing)}")
    if report.get("schema", SCHEMA) > SCHEMA:
        raise ReportError(f"placement report schema {report['schema']} is newer than this moeray reads ({SCHEMA})")
    if not report["layers"]:
        raise ReportError("the placement report has no MoE layers")
    return report


def read_report(path: str | Path) -> dict:
    """A saved placement report, checked; ReportError (one line) when it is not one."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except OSError as exc:
        raise ReportError(f"{path}: {exc.strerror}") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not JSON: {exc}") from None
    try:
        return check_report(report)
    except ReportError as exc:
        raise ReportError(f"{path}: {exc}") from None

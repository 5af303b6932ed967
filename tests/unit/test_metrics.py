"""ServingMetrics: request metrics from hand-built step outputs, and the exposition of engine and
expert metrics read from a fake driver / engine whose coordinator view is a real CoordinatorCore."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moeray.coordinator_core import CoordinatorCore
from moeray.generation.outputs import CompletionOutput, RequestOutput
from moeray.metrics import ServingMetrics
from moeray.stats_wire import LoadSnapshot
from placement import Placement, Topology
from placement.metrics import slot_loads
from placement.policy import PolicyConfig

MODEL = "tiny-test"
L, E, W, SPW = 2, 8, 4, 3


def output(request_id, num_tokens, arrival, first=None, finished_at=None, reason=None, prompt_len=4):
    completion = CompletionOutput(0, "", tuple(range(num_tokens)), None, None, reason)
    return RequestOutput(request_id, None, tuple(range(prompt_len)), (completion,), reason is not None,
                         metrics={"arrival_s": arrival, "first_token_s": first, "finished_s": finished_at,
                                  "placement_version": 0})


def samples(text: str) -> dict:
    """{(sample name, frozenset(labels without model_name)): value}; checks every sample has model_name."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels.get("model_name") == MODEL, s
            labels = frozenset((k, v) for k, v in s.labels.items() if k != "model_name")
            out[(s.name, labels)] = s.value
    return out


def bucket(values: dict, name: str, le: str) -> float:
    return values[(f"{name}_bucket", frozenset({("le", le)}))]


class FakeScheduler:
    def __init__(self):
        self.running = {"a": None, "b": None}
        self.waiting = ["c"]

    def kv_usage(self):
        return [0.25, 0.5, 0.0, 0.125]


class FakeDriver:
    scheduler = FakeScheduler()


class FakeEngine:
    """The engine attributes render() reads; `coordinator` only has to be non-None."""

    def __init__(self, core: CoordinatorCore | None):
        self.core = core
        self.coordinator = None if core is None else object()
        self.workers = [object()] * W
        self.epoch = 1
        self.recoveries = [{"step": 3}]
        self.events = [{"kind": "recovery", "detected_at_s": 10.0, "recovered_at_s": 11.5},
                       {"kind": "scale"}, {"kind": "coordinator_restart"}, {"kind": "scale"}]
        self.target_workers = W + 1
        self.rebalance_errors = []

    def rebalance_health(self):
        return {"state": "ok", "stuck": False}

    def placement(self):
        return self.core.placement if self.core is not None else Placement.contiguous(L, E, W, SPW)


def test_request_metrics_from_a_known_sequence_of_outputs():
    m = ServingMetrics(MODEL, ray_export=False)
    m.request_added("a", 5)
    m.request_added("b", 3)
    m.request_added("gone", 7)
    # times are exact in binary, so the `le` bucket bounds are hit exactly
    m.observe([output("a", 1, arrival=9.5, first=10.0)], now=10.0)
    m.observe([output("a", 2, 9.5, 10.0), output("b", 1, arrival=10.0, first=10.25)], now=10.25)
    # b gets two tokens in one step: they share the 0.5 s gap
    m.observe([output("a", 3, 9.5, 10.0, finished_at=10.75, reason="length"),
               output("b", 3, 10.0, 10.25, finished_at=10.75, reason="stop")], now=10.75)
    m.request_aborted("gone")
    m.request_aborted("never-added")  # unknown ids are not counted

    values = samples(m.render(FakeDriver(), FakeEngine(None)))
    assert values[("moeray:prompt_tokens_total", frozenset())] == 5 + 3  # "gone" was never prefilled
    assert values[("moeray:generation_tokens_total", frozenset())] == 6
    for reason, count in (("length", 1), ("stop", 1), ("abort", 1)):
        assert values[("moeray:request_success_total", frozenset({("finished_reason", reason)}))] == count
    ttft = "moeray:time_to_first_token_seconds"  # a: 0.5, b: 0.25
    assert values[(f"{ttft}_count", frozenset())] == 2
    assert values[(f"{ttft}_sum", frozenset())] == pytest.approx(0.75)
    assert bucket(values, ttft, "0.1") == 0 and bucket(values, ttft, "0.25") == 1 and bucket(values, ttft, "0.5") == 2
    itl = "moeray:inter_token_latency_seconds"  # a: 0.25, 0.5; b: 0.25, 0.25
    assert values[(f"{itl}_count", frozenset())] == 4
    assert values[(f"{itl}_sum", frozenset())] == pytest.approx(1.25)
    assert bucket(values, itl, "0.2") == 0 and bucket(values, itl, "0.3") == 3 and bucket(values, itl, "0.5") == 4
    e2e = "moeray:e2e_request_latency_seconds"  # a: 1.25, b: 0.75
    assert values[(f"{e2e}_count", frozenset())] == 2
    assert values[(f"{e2e}_sum", frozenset())] == pytest.approx(2.0)
    assert bucket(values, e2e, "0.5") == 0 and bucket(values, e2e, "0.8") == 1 and bucket(values, e2e, "1.0") == 1
    assert bucket(values, e2e, "1.5") == 2


def test_a_request_seen_only_in_outputs_counts_its_prompt_from_the_output():
    m = ServingMetrics(MODEL, ray_export=False)
    m.observe([output("x", 1, 0.0, 0.1, prompt_len=9)], now=0.1)
    m.observe([output("x", 1, 0.0, 0.1, prompt_len=9)], now=0.2)  # no new token: nothing changes
    values = samples(m.render(FakeDriver(), FakeEngine(None)))
    assert values[("moeray:prompt_tokens_total", frozenset())] == 9
    assert values[("moeray:generation_tokens_total", frozenset())] == 1
    assert values[("moeray:inter_token_latency_seconds_count", frozenset())] == 0


def rebalanced_core() -> CoordinatorCore:
    """A coordinator that saw a hot expert 0, rebalanced (v1 at step 8) and served 8 more steps."""
    core = CoordinatorCore(placement=Placement.contiguous(L, E, W, SPW), topology=Topology.flat(W, SPW),
                           bytes_per_expert=1000, window_steps=8,
                           policy_config=PolicyConfig(min_gain=1.05, cooldown_s=0, min_tokens=10, confirmations=1))
    load_LE = np.full((L, E), 10, dtype=np.int64)
    load_LE[:, 0] = 400

    def feed(step_lo, step_hi, commit_ms=None):
        p = core.placement
        rows_LS = slot_loads(load_LE, p.phy2log, core.replica_weights_LS).astype(np.int64)
        for w in range(W):
            core.ingest(LoadSnapshot(w, core.epoch, step_lo, step_hi, p.version, load_LE // W,
                                     rows_LS[:, w * SPW:(w + 1) * SPW], commit_ms=commit_ms))

    feed(0, 4)
    feed(4, 8)
    assert core.maybe_plan(now=1.0, force=True) is not None
    core.committed(1, step=8)
    feed(8, 12, commit_ms=3.0)
    feed(12, 16)
    return core


def test_engine_and_expert_metrics_come_from_the_engine_and_the_coordinator_view():
    core = rebalanced_core()
    m = ServingMetrics(MODEL, coordinator_view=lambda engine, timeline: engine.core.view(timeline), ray_export=False)
    values = samples(m.render(FakeDriver(), FakeEngine(core)))
    one = frozenset()
    assert values[("moeray:num_requests_running", one)] == 2
    assert values[("moeray:num_requests_waiting", one)] == 1
    assert [values[("moeray:kv_cache_usage_perc", frozenset({("worker", str(w))}))] for w in range(W)] == \
        [0.25, 0.5, 0.0, 0.125]
    assert values[("moeray:workers", one)] == W and values[("moeray:epoch", one)] == 1
    assert values[("moeray:recoveries_total", one)] == 1 and values[("moeray:placement_version", one)] == 1
    assert values[("moeray:target_workers", one)] == W + 1 and values[("moeray:scale_events_total", one)] == 2
    assert values[("moeray:coordinator_restarts_total", one)] == 1 and values[("moeray:rebalances_stuck_total", one)] == 0
    assert values[("moeray:last_recovery_seconds", one)] == 1.5 and values[("moeray:rebalancing_stopped", one)] == 0
    record = core.records[-1]
    assert values[("moeray:rebalances_total", one)] == 1
    assert values[("moeray:rebalance_slots_moved_total", one)] == record.slots_moved > 0
    assert values[("moeray:rebalance_bytes_moved_total", one)] == record.bytes_moved == 1000 * record.slots_moved
    assert values[("moeray:migration_stall_seconds_count", one)] == 1
    assert values[("moeray:migration_stall_seconds_sum", one)] == pytest.approx(0.003)
    assert values[("moeray:planner_seconds_count", one)] == 1
    assert values[("moeray:planner_seconds_sum", one)] == pytest.approx(record.planning_ms / 1e3)
    # realised over the window (the last 8 steps, all on v1): the replicated hot expert is spread
    realised = core.view(False)["realised_imbalance_per_layer"]
    for layer in range(L):
        value = values[("moeray:expert_imbalance", frozenset({("layer", str(layer))}))]
        assert value == pytest.approx(realised[layer]) and 1.0 <= value < 1.5


def test_label_cardinality_is_bounded_and_no_coordinator_means_no_expert_metrics():
    values = samples(ServingMetrics(MODEL, ray_export=False).render(FakeDriver(), FakeEngine(None)))
    names = {name for name, _ in values}
    assert "moeray:rebalances_total" not in names and "moeray:expert_imbalance" not in names
    core = rebalanced_core()
    m = ServingMetrics(MODEL, coordinator_view=lambda engine, timeline: engine.core.view(timeline), ray_export=False)
    for _, labels in samples(m.render(FakeDriver(), FakeEngine(core))):
        assert {k for k, _ in labels} <= {"le", "layer", "worker", "finished_reason"}
        assert len(labels) <= 1, f"one label beyond model_name at most, got {labels}"


def test_a_coordinator_that_does_not_answer_drops_only_the_expert_metrics():
    def unreachable(engine, timeline):
        raise TimeoutError("the coordinator is being replaced")

    m = ServingMetrics(MODEL, coordinator_view=unreachable, ray_export=False)
    values = samples(m.render(FakeDriver(), FakeEngine(rebalanced_core())))
    names = {name for name, _ in values}
    assert "moeray:workers" in names and "moeray:generation_tokens_total" in names
    assert "moeray:rebalances_total" not in names


def test_host_tier_metrics_come_from_the_coordinators_tier_counts():
    from moeray.tier_config import HostTierConfig
    from moeray.tier_control import TierControl

    core = rebalanced_core()
    core.tiers = TierControl(HostTierConfig(device_slots=1), SPW)
    rows_LS = np.zeros((L, SPW), dtype=np.int64)
    for worker, host_rows in ((0, 4), (2, 9)):
        counts = {"steps": 2, "host_experts": 1, "fetched_experts": 3, "host_rows": host_rows, "fetched_rows": 12,
                  "host_s": 0.25, "prefetched": 0, "prefetch_unused": 1, "copied_bytes": 4000}
        if worker == 2:
            counts.update(proposed=7, overruled=5)  # worker 0 as one whose snapshots lack the keys (none counted)
        core.ingest(LoadSnapshot(worker, core.epoch, 16, 20, core.placement.version, np.zeros((L, E), dtype=np.int64),
                                 rows_LS, tier=counts))
    core.records[-1].planner = "tiering"  # the committed rebalance, as if the live tiering had made it
    m = ServingMetrics(MODEL, coordinator_view=lambda engine, timeline: engine.core.view(timeline), ray_export=False)
    values = samples(m.render(FakeDriver(), FakeEngine(core)))
    one = frozenset()
    assert values[("moeray:tier_device_slots", one)] == 1 and values[("moeray:tier_host_slots", one)] == SPW - 1
    for worker, host_rows in (("0", 4), ("2", 9)):
        labels = frozenset({("worker", worker)})
        assert values[("moeray:tier_host_rows_total", labels)] == host_rows
        assert values[("moeray:tier_fetched_rows_total", labels)] == 12
        assert values[("moeray:tier_host_expert_steps_total", labels)] == 1
        assert values[("moeray:tier_fetched_expert_steps_total", labels)] == 3
        assert values[("moeray:tier_copied_bytes_total", labels)] == 4000
        assert values[("moeray:tier_host_seconds_total", labels)] == 0.25
        assert values[("moeray:tier_split_trial_fetches_total", labels)] == (5 if worker == "2" else 0)
        assert values[("moeray:tier_split_proposals_total", labels)] == (7 if worker == "2" else 0)
    assert ("moeray:tier_host_rows_total", frozenset({("worker", "1")})) not in values  # never reported
    assert values[("moeray:tier_swap_commits_total", one)] == 1
    # without a host tier there are none
    names = {name for name, _ in samples(m.render(FakeDriver(), FakeEngine(rebalanced_core())))}
    assert not any(name.startswith("moeray:tier_") for name in names)

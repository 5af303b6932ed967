"""Coordinator logic without a cluster: snapshot aggregation, policy, plan, commit, the log."""

import dataclasses

import numpy as np
import pytest

from moeray.coordinator_core import CoordinatorCore
from moeray.stats_wire import LoadSnapshot
from moeray.tier_config import HostTierConfig
from moeray.tier_control import TierControl
from placement import Placement, Topology
from placement.migration import migration_between
from placement.policy import PolicyConfig
from placement.tiering import TierRates, slot_loads

L, E, W, SPW = 2, 8, 4, 3


def make_core(**policy):
    placement = Placement.contiguous(L, E, W, SPW)
    return CoordinatorCore(placement=placement, topology=Topology.flat(W, SPW), bytes_per_expert=100,
                           window_steps=8, policy_config=PolicyConfig(**{"min_gain": 1.05, "cooldown_s": 5,
                                                                        "min_tokens": 10, "confirmations": 1, **policy}))


def hot_load(hot_expert=0, scale=50):
    load = np.full((L, E), 10, dtype=np.int64)
    load[:, hot_expert] = 10 * scale
    return load


def feed(core, load_LE, step_lo, step_hi, version=0, workers=range(W)):
    """Split a load over workers as snapshots; rows follow the core's current placement."""
    done = False
    for w in workers:
        rows = np.zeros((L, SPW), dtype=np.int64)
        done = core.ingest(LoadSnapshot(w, core.epoch, step_lo, step_hi, version, load_LE // W, rows)) or done
    return done


def test_a_range_counts_only_when_every_worker_reported():
    core = make_core()
    assert not feed(core, hot_load(), 0, 4, workers=range(W - 1))
    assert core.load_LE.sum() == 0
    assert feed(core, hot_load(), 0, 4, workers=[W - 1])
    np.testing.assert_array_equal(core.load_LE, (hot_load() // W) * W)


def test_a_range_that_can_never_complete_is_dropped_once_a_later_one_does():
    """Workers that resumed counting at different steps ship ranges that never pair up; once every
    worker has shipped a later range, the orphan goes (pending stays bounded)."""
    core = make_core()
    feed(core, hot_load(), 3, 8, workers=[0])  # worker 0 resumed at step 3, the others at 4
    feed(core, hot_load(), 4, 8, workers=range(1, W))
    assert set(core.pending) == {(3, 8), (4, 8)}
    assert feed(core, hot_load(), 8, 12)  # the agreed flush: every worker ships [8, 12)
    assert core.pending == {}


def test_stale_epoch_snapshots_are_ignored():
    core = make_core()
    snap = LoadSnapshot(0, 7, 0, 4, 0, hot_load(), np.zeros((L, SPW), dtype=np.int64))
    assert not core.ingest(snap)


def test_skewed_load_triggers_a_plan_that_replicates_the_hot_expert_then_cooldown():
    core = make_core()
    feed(core, hot_load(), 0, 4)
    before = core.current_imbalance().mean()
    assert before > 2.0
    new_plan = core.maybe_plan(now=100.0)
    assert new_plan is not None and new_plan.placement.version == 1
    assert (new_plan.placement.logcnt[:, 0] > 1).all(), "the hot expert gets replicas"
    assert new_plan.predicted_imbalance_LAYERS.mean() < before
    record = core.records[-1]
    assert record.slots_moved == new_plan.migration.num_copies > 0
    assert record.bytes_moved == 100 * record.slots_moved
    assert core.maybe_plan(now=100.5) is None and "in flight" in core.last_decision.reason
    core.committed(1, step=4)
    assert core.placement.version == 1
    assert core.maybe_plan(now=101.0) is None and "cooldown" in core.last_decision.reason


def test_balanced_load_does_not_rebalance():
    core = make_core()
    feed(core, np.full((L, E), 100, dtype=np.int64), 0, 4)
    assert core.maybe_plan(now=0.0) is None
    assert core.last_decision is not None and not core.last_decision.rebalance


def test_realised_imbalance_is_measured_from_rows_after_commit():
    core = make_core()
    feed(core, hot_load(), 0, 4)
    core.maybe_plan(now=0.0)
    core.committed(1, step=4)
    rows = np.zeros((L, SPW), dtype=np.int64)
    for w in range(W):
        rows[:, 0] = 100 if w else 150  # worker 0 computed 1.5x the others
        core.ingest(LoadSnapshot(w, 0, 4, 8, 1, hot_load() // W, rows.copy(), commit_ms=2.0 + w))
    record = core.records[-1]
    assert record.realised_after == pytest.approx(150 / 112.5)
    assert record.stall_ms == 5.0 and record.realised_steps == 4


def test_commit_of_an_unknown_version_is_refused():
    core = make_core()
    with pytest.raises(ValueError, match="commit of v3"):
        core.committed(3, step=0)


def test_snapshot_wire_round_trip_and_schema_check():
    snap = LoadSnapshot(2, 1, 8, 16, 3, np.arange(L * E).reshape(L, E), np.ones((L, SPW), dtype=np.int64), 1.25)
    back = LoadSnapshot.decode(snap.encode())
    np.testing.assert_array_equal(back.counts_LE, snap.counts_LE)
    assert (back.worker, back.epoch, back.step_lo, back.step_hi, back.version, back.commit_ms) == (2, 1, 8, 16, 3, 1.25)
    assert back.tier is None
    tier = {"host_rows": 7, "fetched_rows": 30, "host_s": 0.0125, "copied_bytes": 3 * 2 ** 31}  # past int32
    assert LoadSnapshot.decode(dataclasses.replace(snap, tier=tier).encode()).tier == tier
    with pytest.raises(ValueError, match="fetched_rows=-2"):  # a worker's differences went backwards
        dataclasses.replace(snap, tier={**tier, "fetched_rows": -2}).encode()
    import msgpack

    bad = msgpack.unpackb(snap.encode())
    bad["schema"] = 99
    with pytest.raises(ValueError, match="unsupported snapshot schema 99"):
        LoadSnapshot.decode(msgpack.packb(bad))


def test_a_drift_restarts_the_planning_estimate_but_noise_does_not():
    core = make_core()
    rng = np.random.default_rng(0)
    for i in range(6):  # hot expert 0, with multinomial noise
        feed(core, rng.multinomial(4000, hot_load(0) / hot_load(0).sum(axis=1, keepdims=True)[0]) * np.ones((L, 1), dtype=np.int64), 4 * i, 4 * i + 4)
    assert core.drifts_detected == []
    feed(core, hot_load(5), 24, 28)  # the hot expert moves
    assert core.drifts_detected == [24]
    share_LE = core.planning_load_LE / core.planning_load_LE.sum(axis=1, keepdims=True)
    assert (share_LE.argmax(axis=1) == 5).all(), "the estimate holds only the new traffic"


def test_versions_are_never_reused_after_an_abandoned_migration():
    """An abandoned v1 may still land late on a worker; the next plan must not also be v1."""
    core = make_core(cooldown_s=0)
    feed(core, hot_load(0), 0, 4)
    assert core.maybe_plan(now=1.0, force=True).placement.version == 1
    core.abandoned(1, "a worker was lost")
    again = core.maybe_plan(now=2.0, force=True)
    assert again.placement.version == 2 and core.records[-1].version == 2
    core.committed(2, step=4)
    assert core.placement.version == 2 and core.in_flight is None


def test_resync_commits_the_adopted_version_or_abandons_the_one_in_flight():
    core = make_core(cooldown_s=0)
    feed(core, hot_load(0), 0, 4)
    in_flight = core.maybe_plan(now=1.0, force=True)
    # the failed step was committing it: the engine adopted it
    core.resync(in_flight.placement, epoch=1, step=9)
    assert core.in_flight is None and core.placement.version == 1 and core.records[-1].committed_at_step == 9
    # a migration in flight that the engine did not adopt is abandoned; calling twice is harmless
    feed(core, hot_load(3), 4, 8)
    assert core.maybe_plan(now=2.0, force=True).placement.version == 2
    for _ in range(2):
        core.resync(core.placement, epoch=2, step=12)
    assert core.in_flight is None and core.placement.version == 1 and core.epoch == 2
    assert "abandoned" in core.records[-1].reason
    assert core.maybe_plan(now=3.0, force=True).placement.version == 3


def test_staging_refuses_versions_that_are_not_newer():
    from moeray.slot_transfer import SlotStaging, StagedVersion

    def version(v):
        return StagedVersion(Placement(np.zeros((1, 1)), 1, 1, v))

    staging = SlotStaging()
    staging.stage(version(2), live_version=1)
    staging.discard()
    with pytest.raises(ValueError, match="cannot stage v2: not newer than v2"):
        staging.stage(version(2), live_version=1)  # a late copy of v2
    with pytest.raises(ValueError, match="not newer than v3"):
        staging.stage(version(3), live_version=3)
    staging.stage(version(4), live_version=3)
    assert staging.take(4).version == 4


def test_the_fault_aware_option_reaches_the_coordinators_plans():
    """rebalance.fault_aware: the coordinator plans with the planner's fault-aware pass, so after a
    rebalance the worst single-worker loss leaves at least as much load with a live copy as the
    plain plan of the same load (strictly more for this skew)."""
    from placement.fault_aware import FaultAwareOptions
    from placement.metrics import surviving_load_after_worker_loss

    load = np.array([[10, 30, 90, 110, 10, 10, 10, 250], [10, 20, 30, 660, 240, 240, 20, 40]], dtype=np.int64) * W
    worst = {}
    for name, fault_aware in (("plain", None), ("fault_aware", FaultAwareOptions())):
        core = make_core()
        core.fault_aware = fault_aware
        feed(core, load, 0, 8)
        new = core.maybe_plan(now=100.0, force=True)
        worst[name] = float(surviving_load_after_worker_loss(load, new.placement).min())
    assert worst["fault_aware"] > worst["plain"], worst


# ---- the host tier (moeray.tier_control) ----------------------------------------------------------


def tiered_core(rebalance_enabled=True, rates=None, **tier):
    core = make_core()
    config = HostTierConfig(**{"device_slots": 1, "cooldown_s": 5.0, "min_gain": 0.0, **tier})
    core.tiers = TierControl(config, SPW, rates=rates)
    core.rebalance_enabled = rebalance_enabled
    return core


def test_with_the_policy_off_live_tiering_swaps_a_hot_host_expert_in_then_cools_down():
    core = tiered_core(rebalance_enabled=False)
    # contiguous: worker 1 holds experts 2, 3 in its slots 3 (the device slot), 4; expert 3 is hot
    feed(core, hot_load(hot_expert=3), 0, 4)
    plan = core.maybe_plan(now=100.0)
    assert plan is not None and plan.placement.version == 1
    assert plan.placement.phy2log[:, 3:6].tolist() == [[3, 2, -1]] * L and plan.migration.num_copies == 2 * L
    assert core.records[-1].planner == "tiering" and "2 promotions" in core.records[-1].reason  # one per layer
    core.committed(1, step=4)
    feed(core, hot_load(hot_expert=2), 4, 8, version=1)
    assert core.maybe_plan(now=102.0) is None and "tier cooldown" in core.last_decision.reason
    assert "rebalance policy off" in core.last_decision.reason
    feed(core, hot_load(hot_expert=2, scale=500), 8, 12, version=1)
    later = core.maybe_plan(now=106.0)  # past the cooldown, expert 2 out-carries expert 3 by far: back
    assert later is not None and later.placement.phy2log[:, 3:5].tolist() == [[2, 3]] * L


def test_a_planner_plan_is_rearranged_so_the_hottest_experts_take_the_device_slots():
    core = tiered_core(rebalance_enabled=True)
    feed(core, hot_load(hot_expert=2), 0, 4)
    plan = core.maybe_plan(now=100.0)
    assert plan is not None and core.records[-1].planner != "tiering"
    load_LE = core.planning_load_LE
    for worker in range(W):
        load_LS = slot_loads(plan.placement, load_LE, worker)
        assert (load_LS[:, 0] >= load_LS[:, 1:].max(axis=1)).all(), (worker, load_LS)
    # the migration is from the live placement to the arranged one, copy for copy
    assert plan.migration.num_copies == migration_between(core.placement, plan.placement, core.topology).num_copies


def test_static_tiering_and_a_modelled_loss_change_nothing():
    static = tiered_core(rebalance_enabled=False, tiering="static")
    feed(static, hot_load(hot_expert=3), 0, 4)
    assert static.maybe_plan(now=100.0) is None and "rebalance policy off" == static.last_decision.reason
    # host rows nearly free, device rows dear: a promotion would lengthen the modelled step
    dear_device = TierRates(device_row_s=1e-3, host_row_s=1e-9, pcie_bytes_per_s=1e12, expert_bytes=1.0, row_bytes=1.0)
    modelled = tiered_core(rebalance_enabled=False, rates=dear_device, cold_path="host")
    feed(modelled, hot_load(hot_expert=3), 0, 4)
    assert modelled.maybe_plan(now=100.0) is None and "no worker gains" in modelled.last_decision.reason


def test_host_tier_counts_are_summed_per_worker_from_every_snapshot_of_the_epoch():
    core = tiered_core()
    rows = np.zeros((L, SPW), dtype=np.int64)
    counts = {"host_rows": 3, "fetched_rows": 5, "host_experts": 2, "fetched_experts": 1, "host_s": 0.5,
              "copied_bytes": 100}
    for step_lo in (0, 4):  # worker 0's ranges complete nothing (no other worker reported): they count
        core.ingest(LoadSnapshot(0, core.epoch, step_lo, step_lo + 4, 0, hot_load() // W, rows, tier=counts))
    core.ingest(LoadSnapshot(1, core.epoch, 0, 4, 0, hot_load() // W, rows, tier=counts))
    core.ingest(LoadSnapshot(2, core.epoch + 1, 0, 4, 0, hot_load() // W, rows, tier=counts))  # another epoch's
    core.ingest(LoadSnapshot(3, core.epoch, 0, 4, 0, hot_load() // W, rows))  # no tier counts shipped
    by_worker = core.view(timeline=False)["tier"]["counts_by_worker"]
    assert by_worker == {0: {k: 2 * v for k, v in counts.items()}, 1: counts}
    assert core.summary()["tier"]["counts_by_worker"] == by_worker
    assert make_core().view(False)["tier"] is None  # no host tier


def test_auto_is_modelled_as_fetch_while_the_workers_trials_overrule_most_proposed_splits():
    control = TierControl(HostTierConfig(device_slots=1, cold_path="auto"), SPW)
    assert control.modelled_path == "auto" and control.policy().mode == "auto"  # nothing proposed yet
    control.observe(0, {"proposed": 0, "overruled": 0, "host_rows": 4})  # a range without proposals: no evidence
    assert control.played_share is None
    control.observe(0, {"proposed": 10, "overruled": 9})
    assert control.played_share == pytest.approx(0.1) and control.policy().mode == "fetch"
    assert control.view()["modelled_path"] == "fetch"
    # decayed counts: (0.7 x played + 8) / (0.7 x proposed + 8) a snapshot of 8 proposals all played;
    # between 40% and 60% played the model stays as it is (a learning trial plays about half)
    control.observe(1, {"proposed": 8, "overruled": 0})
    assert round(control.played_share, 2) == 0.58 and control.modelled_path == "fetch"
    control.observe(1, {"proposed": 8, "overruled": 0})
    assert round(control.played_share, 2) == 0.76 and control.modelled_path == "auto"
    control.observe(0, {"proposed": 30, "overruled": 15})  # half of a big snapshot played: no flip back
    assert round(control.played_share, 2) == 0.58 and control.modelled_path == "auto"
    fetch = TierControl(HostTierConfig(device_slots=1, cold_path="fetch"), SPW)
    fetch.observe(0, {"proposed": 10, "overruled": 0})  # only auto's model changes
    assert fetch.modelled_path == "fetch"
    assert TierControl(HostTierConfig(device_slots=1, cold_path="host"), SPW).modelled_path == "host"

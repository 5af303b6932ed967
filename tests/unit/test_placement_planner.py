"""plan(): balance vs EPLB, migration-awareness, hierarchical packing, API contract."""

import numpy as np
import pytest

from placement.eplb import eplb_placement
from placement.layout import Placement, Topology
from placement.metrics import imbalance
from placement.planner import Plan, PlannerOptions, plan


def lognormal_load(seed, layers=6, experts=64, sigma=0.8):
    rng = np.random.default_rng(seed)
    return rng.lognormal(0.0, sigma, size=(layers, experts)) * 1000


@pytest.mark.parametrize("workers,redundant", [(8, 0), (8, 16), (16, 0), (16, 16), (4, 8)])
def test_balances_at_least_as_well_as_eplb_global(workers, redundant):
    load = lognormal_load(workers + redundant)
    topo = Topology.flat(workers, (64 + redundant) // workers)
    result = plan(load, topo)
    ours = result.predicted_imbalance_LAYERS
    eplb = imbalance(load, eplb_placement(load, topo))
    assert ours.mean() <= eplb.mean() + 1e-12
    assert ours.max() <= eplb.max() * 1.01
    assert np.allclose(ours, imbalance(load, result.placement, result.replica_weights))
    result.placement.validate()


def test_plan_contract_fields():
    load = lognormal_load(1)
    topo = Topology.flat(8, 10)
    first = plan(load, topo, bytes_per_expert=7)
    assert isinstance(first, Plan) and first.placement.version == 0 and first.migration.num_copies == 0
    assert first.replica_weights.shape == (6, 80) and first.planning_ms > 0
    weights = first.replica_weights
    assert (weights[first.placement.phy2log < 0] == 0).all()
    for layer in range(6):
        sums = np.bincount(first.placement.phy2log[layer], weights[layer], minlength=64)
        assert np.allclose(sums, 1.0)
    second = plan(load * 1.5 + 100, topo, current=first.placement, bytes_per_expert=7)
    assert second.placement.version == 1
    assert second.bytes_moved == second.migration.num_copies * 7


def test_same_load_moves_nothing():
    load = lognormal_load(2)
    topo = Topology.flat(8, 9)
    first = plan(load, topo)
    again = plan(load, topo, current=first.placement)
    assert again.migration.num_copies == 0 and again.kept_LAYERS.all()
    assert np.array_equal(again.placement.phy2log, first.placement.phy2log)


def test_drift_moves_a_fraction_of_eplb_and_balances_close_to_fresh():
    load_a, load_b = lognormal_load(3, layers=8), lognormal_load(4, layers=8)
    topo = Topology.flat(8, 8)
    ours_a = plan(load_a, topo)
    ours_b = plan(load_b, topo, current=ours_a.placement)
    fresh_b = plan(load_b, topo)
    moved = ours_b.migration.num_copies
    assert 0 < moved < 0.6 * 8 * 64
    assert ours_b.predicted_imbalance_LAYERS.mean() <= fresh_b.predicted_imbalance_LAYERS.mean() * 1.012
    # the migration really turns the old slot map into the new one
    rebuilt = ours_a.placement.phy2log.copy()
    mig = ours_b.migration
    assert (ours_a.placement.phy2log[mig.layer, mig.src_slot] == mig.expert).all()
    rebuilt[mig.layer, mig.dst_slot] = mig.expert
    kept = ours_b.placement.phy2log >= 0
    assert np.array_equal(rebuilt[kept], ours_b.placement.phy2log[kept])


def test_migration_unaware_option_moves_more():
    load_a, load_b = lognormal_load(5), lognormal_load(6)
    topo = Topology.flat(8, 8)
    base = plan(load_a, topo).placement
    aware = plan(load_b, topo, current=base)
    unaware = plan(load_b, topo, current=base, options=PlannerOptions(migration_aware=False))
    assert aware.migration.num_copies < unaware.migration.num_copies


def test_hierarchical_keeps_each_group_on_one_node():
    load = lognormal_load(7, experts=32)
    topo = Topology(num_nodes=2, workers_per_node=4, slots_per_worker=5)
    result = plan(load, topo, options=PlannerOptions(hierarchical=True, num_groups=4))
    result.placement.validate()
    node_of_slot = np.arange(topo.num_slots) // (topo.workers_per_node * topo.slots_per_worker)
    for layer in range(load.shape[0]):
        row = result.placement.phy2log[layer]
        for group in range(4):
            nodes = set(node_of_slot[(row >= 0) & (row // 8 == group)].tolist())
            assert len(nodes) == 1


def test_rejects_mismatched_current():
    load = lognormal_load(8)
    with pytest.raises(ValueError, match="current placement"):
        plan(load, Topology.flat(8, 9), current=Placement.contiguous(6, 64, 4, 16))

"""Sharded slots in Placement: replica structure vs a slow loop, columns, checks, migrations, compatibility."""

import itertools

import numpy as np
import pytest

from placement.layout import Placement, Topology, migration_between
from placement.metrics import imbalance, slot_loads, slot_rows, worker_loads
from placement.shards import replica_structure

# layer 0: expert 0 = replica of shards (0.25 | 0.75) + a whole replica; expert 1 = 3 uneven shards
# (0.5 | 0.3 | 0.2); expert 2 whole. layer 1: all whole, expert 0 replicated.
PHY2LOG = np.array([[0, 1, 0, 1, 2, 0, 1, -1], [0, 1, 2, 0, -1, -1, -1, -1]])
WIDTH = np.array([[0.25, 0.5, 0.75, 0.3, 1.0, 1.0, 0.2, 0.0], [1, 1, 1, 1, 0, 0, 0, 0]])


def slow_structure(phy2log_S, width_S):
    """Replica index and [start, stop) of each slot by walking every expert's slots in order."""
    replica, start, stop = {}, {}, {}
    for expert in set(phy2log_S.tolist()) - {-1}:
        filled = 0.0
        for slot in [s for s, e in enumerate(phy2log_S) if e == expert]:
            replica[slot] = int(np.floor(filled + 1e-9))
            start[slot] = filled - replica[slot]
            filled += width_S[slot]
            stop[slot] = filled - replica[slot]
    return replica, start, stop


def test_replica_structure_matches_a_slow_walk():
    replica_LS, start_LS, stop_LS, count_LE = replica_structure(PHY2LOG, WIDTH, 3)
    for layer in range(2):
        replica, start, stop = slow_structure(PHY2LOG[layer], WIDTH[layer])
        for slot, r in replica.items():
            assert replica_LS[layer, slot] == r
            assert np.isclose(start_LS[layer, slot], start[slot]) and np.isclose(stop_LS[layer, slot], stop[slot])
    assert count_LE.tolist() == [[2, 1, 1], [2, 1, 1]]
    assert (replica_LS[PHY2LOG < 0] == -1).all()


def test_columns_of_a_replica_tile_the_ffn_width():
    placement = Placement(PHY2LOG, 3, 2, shard_width=WIDTH).validate()
    columns = placement.shard_columns(2047)  # odd F: boundaries round, yet shards tile [0, F)
    for layer in range(2):
        for expert in range(3):
            for r in range(int(placement.num_replicas[layer, expert])):
                slots = np.flatnonzero((PHY2LOG[layer] == expert) & (placement.replica_of_slot[layer] == r))
                ranges = sorted(map(tuple, columns[layer, slots]))
                assert ranges[0][0] == 0 and ranges[-1][1] == 2047
                assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_placement_defaults_keep_the_old_constructor():
    old = Placement(PHY2LOG[1:], 3, 2, 4)
    assert old.version == 4 and old.replica_weights is None and old.shard_width is None and not old.is_sharded
    assert np.array_equal(old.num_replicas, old.logcnt) and np.array_equal(old.replica_of_slot[0, :4], [0, 0, 0, 1])
    assert np.allclose(old.weights_LS, [[0.5, 1, 1, 0.5, 0, 0, 0, 0]])
    nxt = old.with_phy2log(PHY2LOG[1:])
    assert nxt.version == 5 and nxt.replica_weights is None


@pytest.mark.parametrize("width,message", [
    ([[0.6, 1, 0.6, 1, 1, 0.8, 1, 0]], "replica must end at a slot boundary"),
    ([[0.25, 0.5, 0.75, 0.3, 1, 0.5, 0.2, 0]], "whole number of replicas"),
    ([[0.25, 0.5, 0.75, 0.3, 1, 1, 0.2, 0.5]], "free slot"),
    ([[0.25, 0.5, 0.75, 0.3, 1, 1, 1.2, 0]], "0 < width <= 1"),
])
def test_validate_names_the_broken_width(width, message):
    with pytest.raises(ValueError, match=message):
        Placement(PHY2LOG[:1], 3, 2, shard_width=np.array(width, dtype=float)).validate()


def test_validate_checks_replica_weights():
    good = np.array([[0.4, 1, 0.4, 1, 1, 0.6, 1, 0]])
    Placement(PHY2LOG[:1], 3, 2, replica_weights=good, shard_width=WIDTH[:1]).validate()
    with pytest.raises(ValueError, match="first shard of its replica"):
        Placement(PHY2LOG[:1], 3, 2, replica_weights=good * [[1, 1, 0.5, 1, 1, 1, 1, 1]], shard_width=WIDTH[:1]).validate()
    with pytest.raises(ValueError, match="add up to"):
        Placement(PHY2LOG[:1], 3, 2, replica_weights=good * [[1, 1, 1, 1, 1, 0.5, 1, 1]] * 1.0, shard_width=WIDTH[:1]).validate()


def test_metrics_count_every_row_on_every_shard_and_compute_by_width():
    load = np.array([[100.0, 10.0, 50.0], [8.0, 4.0, 2.0]])
    weights = np.array([[0.4, 1, 0.4, 1, 1, 0.6, 1, 0], [0.5, 1, 1, 0.5, 0, 0, 0, 0]])
    rows = slot_rows(load, PHY2LOG, weights, WIDTH)
    assert np.allclose(rows[0], [40, 10, 40, 10, 50, 60, 10, 0])
    compute = slot_loads(load, PHY2LOG, weights, WIDTH)
    assert np.allclose(compute[0], [10, 5, 30, 3, 50, 60, 2, 0])
    assert np.allclose(compute.sum(axis=1), load.sum(axis=1))  # sharding conserves compute
    placement = Placement(PHY2LOG, 3, 2, replica_weights=weights, shard_width=WIDTH).validate()
    assert np.allclose(worker_loads(load, PHY2LOG, 2, weights, WIDTH)[0], [15, 33, 110, 2])
    assert np.allclose(imbalance(load, placement)[0], 110 / 40)  # the placement's own weights and widths


def _apply(old, new, migration, ffn=1000):
    """Columns each new slot holds after the migration: the kept part of its old slot + the copies."""
    old_cols, new_cols = old.shard_columns(ffn), new.shard_columns(ffn)
    for layer in range(new.num_layers):
        for slot in np.flatnonzero(new.phy2log[layer] >= 0):
            have = np.zeros(ffn, dtype=bool)
            if old.phy2log[layer, slot] == new.phy2log[layer, slot]:
                have[slice(*old_cols[layer, slot])] = True
            for i in np.flatnonzero((migration.layer == layer) & (migration.dst_slot == slot)):
                src = migration.src_slot[i]
                assert old.phy2log[layer, src] == migration.expert[i] == new.phy2log[layer, slot]
                lo, hi = round(migration.col_start[i] * ffn), round(migration.col_stop[i] * ffn)
                assert old_cols[layer, src, 0] <= lo and hi <= old_cols[layer, src, 1]  # the source holds them
                have[lo:hi] = True
            assert have[slice(*new_cols[layer, slot])].all()


def test_migration_between_sharded_placements_brings_every_column():
    whole = Placement(np.array([[0, 1, 2, 3, 0, 2, 1, 3]]), 4, 2)
    sharded = Placement(np.array([[0, 1, 2, 3, 0, 2, 1, 3]]), 4, 2, shard_width=np.array([[0.5, 1, 1, 1, 0.5, 1, 1, 1]]))
    resharded = Placement(np.array([[0, 1, 0, 3, 0, 2, 1, 2]]), 4, 2, shard_width=np.array([[0.3, 1, 0.3, 1, 0.4, 1, 1, 1]]))
    for old, new in [(whole, sharded), (sharded, resharded), (resharded, whole), (sharded, whole)]:
        migration = migration_between(old.validate(), new.validate())
        _apply(old, new, migration)
        assert migration.bytes_moved(100) == round(migration.copied_fraction.sum() * 100)
    # cutting whole slots down to shards moves nothing; growing shards back copies the other half
    assert migration_between(whole, sharded).num_copies == 0
    grow = migration_between(sharded, whole)
    assert sorted(zip(grow.dst_slot.tolist(), grow.src_slot.tolist())) == [(0, 4), (4, 0)]
    assert grow.bytes_moved(100) == 100


def test_whole_migration_keeps_its_fields():
    old = Placement(np.array([[0, 1, 2, 3]]), 4, 2)
    new = Placement(np.array([[0, 2, 1, 3]]), 4, 2)
    migration = migration_between(old, new, Topology.flat(2, 2))
    assert migration.col_start is None and migration.bytes_moved(7) == 14
    assert migration.src_slot.tolist() == [2, 1]


def test_topology_link_classes():
    topo = Topology(2, 4, 3, intra_node_gbps=300, inter_node_gbps=50)
    assert topo.link_class(np.array([0, 0, 0]), np.array([0, 3, 4])).tolist() == [0, 1, 2]
    assert Topology.flat(4, 2) == Topology(1, 4, 2)
    with pytest.raises(ValueError, match="inter_node_gbps"):
        Topology(2, 4, 3, inter_node_gbps=0)

"""Per-batch split (placement.batch_split) against a brute-force oracle, and the pair -> slot rule."""

import itertools

import numpy as np
import pytest

from placement.batch_split import (
    ReplicaUnits,
    busiest_compute,
    integer_rows,
    pairs_to_slots,
    split_batch,
    water_fill_rates,
    worker_compute,
)
from placement.dispatch import rows_from_weights
from placement.layout import Placement


def compositions(total, parts):
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in compositions(total - first, parts - 1):
            yield (first, *rest)


def brute_force_busiest(phy2log_S, slots_per_worker, counts_E):
    """Minimum over every integer split of the replicated experts of the busiest worker's rows."""
    num_workers = len(phy2log_S) // slots_per_worker
    slots = {e: [s for s, x in enumerate(phy2log_S) if x == e] for e in range(len(counts_E))}
    base = np.zeros(num_workers)
    replicated = [e for e, where in slots.items() if len(where) > 1]
    for e, where in slots.items():
        if len(where) == 1:
            base[where[0] // slots_per_worker] += counts_E[e]
    best = np.inf
    for choice in itertools.product(*(list(compositions(int(counts_E[e]), len(slots[e]))) for e in replicated)):
        load = base.copy()
        for e, rows in zip(replicated, choice):
            for slot, x in zip(slots[e], rows):
                load[slot // slots_per_worker] += x
        best = min(best, load.max())
    return best


def random_whole_layout(rng, workers, slots_per_worker, experts):
    """Every expert once, extra slots random replicas (never twice on a worker), some left free."""
    num_slots = workers * slots_per_worker
    row = np.full(num_slots, -1)
    order = rng.permutation(num_slots)
    row[order[:experts]] = np.arange(experts)
    for slot in order[experts:]:
        expert = rng.integers(experts)
        lo = slot // slots_per_worker * slots_per_worker
        if rng.random() < 0.8 and expert not in row[lo: lo + slots_per_worker]:
            row[slot] = expert
    return Placement(row[None], experts, slots_per_worker).validate()


def test_split_is_optimal_on_small_cases():
    rng = np.random.default_rng(1)
    checked = 0
    while checked < 150:
        workers, spw = int(rng.integers(2, 5)), int(rng.integers(1, 4))
        experts = int(rng.integers(1, workers * spw + 1))  # often not divisible by the workers
        placement = random_whole_layout(rng, workers, spw, experts)
        counts = rng.integers(0, 6, size=experts)
        if np.prod([(counts[e] + 1) ** (placement.logcnt[0, e] - 1) for e in range(experts)]) > 5000:
            continue
        units = ReplicaUnits.of(placement)
        rows = split_batch(units, counts[None])
        assert rows.sum() == counts.sum()
        assert busiest_compute(units, rows[None])[0, 0] == brute_force_busiest(placement.phy2log[0], spw, counts)
        checked += 1


@pytest.mark.parametrize("tokens,top_k", [(1, 1), (1, 3), (5, 3), (17, 2)])
def test_awkward_batches_route_every_pair_once(tokens, top_k):
    # 7 experts on 3 workers x 4 slots (7 is not divisible by 3); worker 2 gets no routed expert
    placement = Placement(np.array([[0, 1, 2, 3, 4, 5, 6, 0, 1, -1, -1, -1]]), 7, 4).validate()
    rng = np.random.default_rng(tokens * 10 + top_k)
    ids = rng.choice([0, 1, 2, 3], size=(tokens, top_k))  # only experts on workers 0 and 1
    counts = np.bincount(ids.ravel(), minlength=7)
    units = ReplicaUnits.of(placement)
    rows = split_batch(units, counts[None, :])
    pair, slot = pairs_to_slots(ids, placement.phy2log[0], placement.replica_of_slot[0], rows[0], 7)
    assert np.array_equal(np.sort(pair), np.arange(tokens * top_k))  # whole experts: one slot per pair
    assert np.array_equal(np.bincount(slot, minlength=12), rows[0])
    assert (placement.phy2log[0, slot] == ids.ravel()[pair]).all()
    assert busiest_compute(units, rows[None])[0, 0] == brute_force_busiest(placement.phy2log[0], 4, counts)


def test_deterministic_and_independent_of_the_other_batches():
    rng = np.random.default_rng(4)
    placement = random_whole_layout(rng, 4, 5, 13)
    units = ReplicaUnits.of(placement)
    counts = rng.integers(0, 40, size=(6, 1, 13))
    together = split_batch(units, counts)
    assert np.array_equal(together, split_batch(units, counts))
    for b in range(6):
        assert np.array_equal(together[b], split_batch(units, counts[b]))


def test_never_worse_than_the_planned_weights():
    rng = np.random.default_rng(5)
    for _ in range(20):
        workers, spw = int(rng.integers(2, 7)), int(rng.integers(2, 5))
        placement = random_whole_layout(rng, workers, spw, int(rng.integers(2, min(9, workers * spw + 1))))
        weights = rng.random(placement.phy2log.shape) * (placement.phy2log >= 0)
        weights /= np.bincount(np.maximum(placement.phy2log[0], 0), weights[0])[np.maximum(placement.phy2log[0], 0)]
        weights *= placement.phy2log >= 0
        units = ReplicaUnits.of(placement)
        counts = rng.integers(0, 30, size=(8, 1, placement.num_experts))
        ours = busiest_compute(units, split_batch(units, counts, weights))
        planned_rows = rows_from_weights(counts[:, 0], np.broadcast_to(placement.log2phy[0], (8, *placement.log2phy.shape[1:])),
                                         np.broadcast_to(_weights_ER(placement, weights), (8, *placement.log2phy.shape[1:])),
                                         placement.num_slots)
        assert (ours <= busiest_compute(units, planned_rows[:, None])).all()


def _weights_ER(placement, weights_LS):
    log2phy = placement.log2phy[0]
    return np.where(log2phy >= 0, weights_LS[0][np.maximum(log2phy, 0)], 0.0)


def test_sharded_replicas_get_their_replica_rows_on_every_shard():
    # expert 0: two replicas, the first of two shards (widths 0.25 / 0.75), the second whole;
    # expert 1: one replica of 3 uneven shards; expert 2 whole
    phy2log = np.array([[0, 1, 0, 1, 2, 0, 1, -1]])
    width = np.array([[0.25, 0.5, 0.75, 0.3, 1.0, 1.0, 0.2, 0.0]])
    placement = Placement(phy2log, 3, 2, shard_width=width).validate()
    assert placement.num_replicas.tolist() == [[2, 1, 1]]
    units = ReplicaUnits.of(placement)
    counts = np.array([9, 4, 3])
    rows = split_batch(units, counts[None])
    assert rows[0, 1] == rows[0, 3] == rows[0, 6] == 4  # every shard of expert 1's one replica
    assert rows[0, 0] == rows[0, 2] and rows[0, 0] + rows[0, 5] == 9  # expert 0: shards share, replicas split
    compute = worker_compute(units, rows[None, None])[0, 0]
    assert np.isclose(compute.sum(), counts.sum())  # sharding conserves compute
    ids = np.array([[0, 1], [0, 2], [0, 0], [1, 2], [0, 1], [0, 2], [0, 0], [1, 2], [0, 0]])[:, :2]
    counts = np.bincount(ids.ravel(), minlength=3)
    rows = split_batch(units, counts[None])
    pair, slot = pairs_to_slots(ids, phy2log[0], placement.replica_of_slot[0], rows[0], 3)
    assert np.array_equal(np.bincount(slot, minlength=8), rows[0])
    fan = np.bincount(pair, minlength=ids.size)
    assert set(fan[ids.ravel() == 1].tolist()) == {3}  # expert 1's pairs reach its 3 shards
    assert set(fan[ids.ravel() == 0].tolist()) <= {1, 2}


def test_pairs_to_slots_refuses_rows_that_do_not_match_the_batch():
    placement = Placement(np.array([[0, 1, 0, 1]]), 2, 2)
    with pytest.raises(ValueError, match="expert 0"):
        pairs_to_slots(np.array([[0, 1]]), placement.phy2log[0], placement.replica_of_slot[0], np.array([1, 1, 1, 0]), 2)


def test_water_fill_rates_matches_a_bisection_oracle():
    rng = np.random.default_rng(6)
    base = rng.random((50, 4)) * 10
    rate = rng.choice([1.0, 0.5, 0.25], size=(50, 4))
    total = rng.random(50) * 20
    shares = water_fill_rates(base, rate, total)
    assert np.allclose(shares.sum(axis=1), total) and (shares >= 0).all()
    for x in range(50):
        lo, hi = 0.0, 100.0
        for _ in range(100):  # level such that sum((level - base) / rate)+ = total
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.maximum(mid - base[x], 0).dot(1 / rate[x]) < total[x] else (lo, mid)
        assert np.allclose(shares[x], np.maximum(lo - base[x], 0) / rate[x], atol=1e-6)
    pairs = water_fill_rates(base[:, :2], rate[:, :2], total)  # the closed form for two replicas
    oracle = water_fill_rates(np.c_[base[:, :2], np.full(50, 1e300)], np.c_[rate[:, :2], np.ones(50)], total)[:, :2]
    assert np.allclose(pairs, oracle)


def test_integer_rows_keep_totals_and_stay_within_one_row():
    rng = np.random.default_rng(7)
    share = rng.random((200, 4)) * 5
    present = rng.random((200, 4)) < 0.8
    present[:, 0] = True
    share = np.where(present, share, 0)
    total = np.rint(share.sum(axis=1)).astype(int)
    share *= np.where(share.sum(axis=1) > 0, total / np.maximum(share.sum(axis=1), 1e-12), 0)[:, None]
    rows = integer_rows(share, total, present)
    assert np.array_equal(rows.sum(axis=1), total)
    assert (np.abs(rows - share) < 1 + 1e-9).all() and (rows[~present] == 0).all()

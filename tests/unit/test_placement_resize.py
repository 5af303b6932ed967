"""Planning across worker counts (placement/resize.py): every expert keeps a copy, workers that
stay keep what they can, and the plan for W' balances as a fresh plan for W' does."""

import numpy as np
import pytest

from placement import Placement
from placement.metrics import imbalance
from placement.planner import plan
from placement.layout import Topology
from placement.resize import carry_over, resize_plan

L, E = 3, 10


def skewed_load(seed=0):
    rng = np.random.default_rng(seed)
    return rng.zipf(1.5, size=(L, E)).astype(np.float64) * 10


@pytest.mark.parametrize("old_w,new_w", [(2, 4), (4, 3), (3, 1), (1, 3), (4, 4), (5, 2)])
def test_carry_over_keeps_every_expert_and_what_staying_workers_held(old_w, new_w):
    spw_old, spw_new = -(-E // old_w) + 1, -(-E // new_w) + 1
    current = Placement.contiguous(L, E, old_w, spw_old)
    load = skewed_load()
    carried = carry_over(current, new_w, spw_new, load)
    assert carried.shape == (L, new_w * spw_new)
    Placement(carried, E, spw_new, 0).validate()
    for layer in range(L):
        assert set(carried[layer][carried[layer] >= 0].tolist()) == set(range(E))  # every expert somewhere
        for w in range(min(old_w, new_w)):  # staying workers keep their first slots' experts in place
            keep = min(spw_old, spw_new)
            old = current.phy2log[layer, w * spw_old: w * spw_old + keep]
            new = carried[layer, w * spw_new: w * spw_new + keep]
            assert np.array_equal(new[old >= 0], old[old >= 0])


def test_carry_over_refuses_too_few_slots():
    with pytest.raises(ValueError, match="cannot hold 10 experts"):
        carry_over(Placement.contiguous(L, E, 2, 5), 2, 4, skewed_load())


@pytest.mark.parametrize("old_w,new_w", [(2, 4), (4, 3), (4, 2)])
def test_resize_plan_balances_like_a_fresh_plan_and_bumps_the_version(old_w, new_w):
    spw_new = -(-E // new_w) + 1
    load = skewed_load(1)
    current = Placement.contiguous(L, E, old_w, -(-E // old_w) + 1)
    current = Placement(current.phy2log, E, current.slots_per_worker, 7)
    resized = resize_plan(load, current, new_w, spw_new)
    assert resized.placement.version == 8 and resized.placement.num_workers == new_w
    fresh = plan(load, Topology.flat(new_w, spw_new))
    got = imbalance(load, resized.placement, resized.replica_weights).mean()
    want = imbalance(load, fresh.placement, fresh.replica_weights).mean()
    assert got <= want * 1.05 + 1e-9


def test_resize_plan_without_measured_load_uses_uniform_load():
    resized = resize_plan(None, Placement.contiguous(L, E, 2, 5), 3, 4)
    resized.placement.validate()
    assert resized.placement.num_workers == 3


@pytest.mark.parametrize("old_w,new_w,spw_old,spw_new", [(4, 2, 4, 5), (8, 4, 2, 3), (3, 2, 5, 5)])
def test_carry_over_drops_replicas_when_the_homeless_need_their_slots(old_w, new_w, spw_old, spw_new):
    """Staying workers full of replicas (every slot used): copies are dropped, never the last one."""
    rng = np.random.default_rng(old_w * 10 + new_w)
    rows = []
    for _ in range(L):
        row = np.concatenate([rng.permutation(E), rng.integers(0, E, old_w * spw_old - E)])
        rows.append(row)  # every expert once, the rest replicas: no free slot anywhere
    current = Placement(np.array(rows), E, spw_old, 0)
    carried = carry_over(current, new_w, spw_new, skewed_load(3))
    Placement(carried, E, spw_new, 0).validate()
    for layer in range(L):
        assert set(carried[layer][carried[layer] >= 0].tolist()) == set(range(E))
    resize_plan(skewed_load(3), current, new_w, spw_new).placement.validate()

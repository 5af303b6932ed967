"""Property tests: every plan keeps the placement invariants, fresh or re-planned."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from placement.layout import Topology
from placement.planner import plan


@st.composite
def problems(draw):
    workers = draw(st.integers(1, 6))
    experts = draw(st.integers(1, 24))
    min_spw = -(-experts // workers)
    spw = draw(st.integers(min_spw, min_spw + 3))
    layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    zeros = draw(st.booleans())
    load = rng.lognormal(0, draw(st.floats(0.1, 1.5)), size=(layers, experts)) * 100
    if zeros:
        load[:, rng.random(experts) < 0.3] = 0
    return load, Topology.flat(workers, spw), rng


def check(result, load, topo):
    placement = result.placement.validate()  # values, >= 1 slot per expert, no duplicate on a worker
    assert placement.phy2log.shape == (load.shape[0], topo.num_slots)
    for layer in range(load.shape[0]):
        for expert in range(load.shape[1]):
            slots = placement.log2phy[layer, expert]
            slots = slots[slots >= 0]
            assert len(slots) == placement.logcnt[layer, expert] >= 1
            assert (placement.phy2log[layer, slots] == expert).all()
            assert np.isclose(result.replica_weights[layer, slots].sum(), 1.0)
    assert (result.replica_weights >= 0).all()
    assert (result.replica_weights[placement.phy2log < 0] == 0).all()


@settings(max_examples=40, deadline=None)
@given(problems())
def test_fresh_plan_invariants(problem):
    load, topo, _ = problem
    check(plan(load, topo), load, topo)


@settings(max_examples=40, deadline=None)
@given(problems())
def test_replan_invariants_and_migration_sources(problem):
    load, topo, rng = problem
    first = plan(load, topo)
    drifted = load[:, rng.permutation(load.shape[1])] * rng.lognormal(0, 0.3, size=load.shape)
    second = plan(drifted, topo, current=first.placement)
    check(second, drifted, topo)
    mig = second.migration
    assert (first.placement.phy2log[mig.layer, mig.src_slot] == mig.expert).all()
    assert (second.placement.phy2log[mig.layer, mig.dst_slot] == mig.expert).all()

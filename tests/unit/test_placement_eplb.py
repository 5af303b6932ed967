"""The EPLB port: the README test vector, a per-row loop reference, and its known duplicate flaw."""

import numpy as np
import pytest

from placement.eplb import (
    balanced_packing,
    default_num_groups,
    eplb_placement,
    rebalance_experts,
    replicate_experts,
    static_placement,
)
from placement.layout import Placement, Topology

README_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
README_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def test_readme_vector_hierarchical():
    phy2log, log2phy, logcnt = rebalance_experts(np.array(README_WEIGHT), 16, 4, 2, 8)
    assert phy2log.tolist() == README_PHY2LOG
    # log2phy is the inverse of phy2log and logcnt counts the replicas.
    for layer in range(2):
        for expert in range(12):
            slots = log2phy[layer, expert][log2phy[layer, expert] >= 0]
            assert len(slots) == logcnt[layer, expert]
            assert (phy2log[layer, slots] == expert).all()
    assert (logcnt.sum(axis=1) == 16).all()


def _packing_loop_reference(weight, num_packs):
    """Plain per-row loop of the balanced packing, written independently of the vectorised one."""
    rows, n = weight.shape
    per_pack = n // num_packs
    pack_index = np.full((rows, n), -1)
    rank = np.full((rows, n), -1)
    for i in range(rows):
        order = sorted(range(n), key=lambda j: (-weight[i, j], j))
        loads, items = [0.0] * num_packs, [0] * num_packs
        for j in order:
            pack = min((p for p in range(num_packs) if items[p] < per_pack), key=lambda p: (loads[p], p))
            pack_index[i, j], rank[i, j] = pack, items[pack]
            loads[pack] += weight[i, j]
            items[pack] += 1
    return pack_index, rank


@pytest.mark.parametrize("seed", range(5))
def test_balanced_packing_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    weight = rng.integers(0, 20, size=(4, 24)).astype(float)  # small ints: many ties
    got = balanced_packing(weight, 6)
    want = _packing_loop_reference(weight, 6)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert (np.bincount(got[0][0], minlength=6) == 4).all()


def test_replicate_experts_gives_hottest_more_replicas():
    phy2log, rank, logcnt = replicate_experts(np.array([[100.0, 10.0, 40.0]]), 6)
    assert logcnt.tolist() == [[3, 1, 2]]
    assert sorted(phy2log[0].tolist()) == [0, 0, 0, 1, 2, 2]
    for expert in range(3):
        assert sorted(rank[0][phy2log[0] == expert].tolist()) == list(range(logcnt[0, expert]))


def test_global_is_hierarchical_with_one_group_one_node():
    rng = np.random.default_rng(0)
    weight = rng.lognormal(size=(3, 16))
    global_phy2log, _, _ = rebalance_experts(weight, 20, num_groups=3, num_nodes=2, num_gpus=4)  # 3 % 2: global
    flat_phy2log, _, _ = rebalance_experts(weight, 20, num_groups=1, num_nodes=1, num_gpus=4)
    assert np.array_equal(global_phy2log, flat_phy2log)


def test_eplb_can_put_two_replicas_of_one_expert_on_one_gpu():
    """EPLB's known flaw (its issue #22): nothing stops duplicate replicas on one GPU."""
    placement = eplb_placement(np.array([[1000.0, 1.0, 1.0, 1.0]]), Topology.flat(2, 4))
    with pytest.raises(ValueError, match="more than once"):
        placement.validate()


def test_static_placement_is_contiguous():
    placement = static_placement(2, 8, Topology.flat(4, 3))
    assert placement.phy2log[0].tolist() == [0, 1, -1, 2, 3, -1, 4, 5, -1, 6, 7, -1]
    assert isinstance(placement.validate(), Placement)


def test_default_num_groups_nests():
    assert default_num_groups(256, 4) == 8
    assert default_num_groups(64, 1) == 8
    assert default_num_groups(12, 2) == 12

"""split_to_slots: the exact device rule, its proportions, and that it beats position mod replicas."""

import numpy as np

from placement.dispatch import mod_split, replica_weights_by_expert, split_to_slots, step_imbalance
from placement.layout import Topology
from placement.planner import plan
from placement.traces import sample_batch_ids


def slow_rule(topk_ids, log2phy, weights):
    """The rule as written in the docstring, one pair at a time."""
    flat = topk_ids.ravel().tolist()
    counts = {e: flat.count(e) for e in set(flat)}
    seen = {}
    out = []
    for e in flat:
        j = seen.get(e, 0)
        seen[e] = j + 1
        n = int((log2phy[e] >= 0).sum())
        cum = np.cumsum(weights[e][:n])
        r = int(sum(1 for w in cum[:-1] if w <= (j + 0.5) / counts[e]))
        out.append(log2phy[e][min(r, n - 1)])
    return np.array(out).reshape(topk_ids.shape)


def test_matches_the_written_rule():
    rng = np.random.default_rng(0)
    log2phy = np.array([[0, 3, 5], [1, -1, -1], [2, 4, -1]])
    weights = np.array([[0.2, 0.5, 0.3], [1.0, 0, 0], [0.75, 0.25, 0]])
    ids = rng.integers(0, 3, size=(37, 2))
    assert np.array_equal(split_to_slots(ids, log2phy, weights), slow_rule(ids, log2phy, weights))


def test_split_follows_weights_within_one_token():
    log2phy = np.array([[0, 1, 2]])
    weights = np.array([[0.5, 0.3, 0.2]])
    for count in (1, 7, 10, 101):
        slots = split_to_slots(np.zeros((count, 1), dtype=int), log2phy, weights)
        got = np.bincount(slots.ravel(), minlength=3)
        assert (np.abs(got - weights[0] * count) <= 1).all() and got.sum() == count


def test_weights_by_expert_follow_log2phy():
    weights_LS = np.array([[0.25, 1.0, 0.75]])
    log2phy_LER = np.array([[[0, 2], [1, -1]]])
    assert np.allclose(replica_weights_by_expert(weights_LS, log2phy_LER), [[[0.25, 0.75], [1.0, 0.0]]])


def test_weighted_split_beats_mod_split_per_step():
    rng = np.random.default_rng(3)
    load = rng.lognormal(0, 0.9, size=(4, 32)) * 1000
    topo = Topology.flat(4, 10)
    result = plan(load, topo)
    log2phy = result.placement.log2phy
    weights = replica_weights_by_expert(result.replica_weights, log2phy)
    ours, base = [], []
    for layer in range(4):
        for _ in range(20):
            ids = sample_batch_ids(load[layer], 512, 4, rng)
            ours.append(step_imbalance(split_to_slots(ids, log2phy[layer], weights[layer]), 40, 10))
            base.append(step_imbalance(mod_split(ids, log2phy[layer]), 40, 10))
    assert np.mean(ours) < np.mean(base)

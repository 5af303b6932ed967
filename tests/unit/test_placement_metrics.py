"""imbalance(): max over workers / mean over workers, with equal or given replica splits."""

import numpy as np

from placement.layout import Placement
from placement.metrics import equal_replica_weights, imbalance, worker_loads


def test_imbalance_by_hand():
    # 2 workers x 2 slots; layer 0: experts 0,1 | 2,3 ; expert loads 10,20 | 30,40 -> 30 vs 70
    placement = Placement(np.array([[0, 1, 2, 3]]), num_experts=4, slots_per_worker=2)
    load = np.array([[10.0, 20.0, 30.0, 40.0]])
    assert np.allclose(worker_loads(load, placement.phy2log, 2), [[30.0, 70.0]])
    assert np.allclose(imbalance(load, placement), [70.0 / 50.0])


def test_replicas_split_equally_by_default_and_by_weights_when_given():
    # expert 0 on both workers; worker 0 also holds 1, worker 1 holds 2 and a free slot
    placement = Placement(np.array([[0, 1, -1, 0, 2, -1]]), num_experts=3, slots_per_worker=3)
    load = np.array([[100.0, 10.0, 50.0]])
    weights = equal_replica_weights(placement.phy2log, 3)
    assert np.allclose(weights, [[0.5, 1, 0, 0.5, 1, 0]])
    assert np.allclose(worker_loads(load, placement.phy2log, 3), [[60.0, 100.0]])
    tuned = np.array([[0.7, 1, 0, 0.3, 1, 0]])
    assert np.allclose(worker_loads(load, placement.phy2log, 3, tuned), [[80.0, 80.0]])
    assert np.allclose(imbalance(load, placement, tuned), [1.0])


def test_empty_layer_is_balanced():
    placement = Placement(np.array([[0, 1]]), num_experts=2, slots_per_worker=1)
    assert imbalance(np.zeros((1, 2)), placement).tolist() == [1.0]


def test_surviving_load_after_worker_loss_counts_experts_with_a_copy_elsewhere():
    from placement.metrics import surviving_load_after_worker_loss

    # 1 layer, 4 experts, 2 workers x 3 slots: expert 0 replicated on both workers, 1 and 2 on w0, 3 on w1
    placement = Placement(np.array([[0, 1, 2, 0, 3, -1]]), 4, 3, 0)
    load = np.array([[40.0, 10.0, 20.0, 30.0]])
    got = surviving_load_after_worker_loss(load, placement)
    np.testing.assert_allclose(got, [(40 + 30) / 100, (40 + 10 + 20) / 100])
    # Slow oracle on random replicated placements: an expert survives iff a copy is on another worker.
    rng = np.random.default_rng(0)
    for seed in range(5):
        from tests.helpers import random_replicated_placement

        p = random_replicated_placement(2, 7, 3, 4, seed=seed)
        load = rng.random((2, 7))
        want = []
        for lost in range(3):
            kept = 0.0
            for layer in range(2):
                for e in range(7):
                    workers = {s // 4 for s in range(12) if p.phy2log[layer, s] == e}
                    kept += load[layer, e] if workers - {lost} else 0.0
            want.append(kept / load.sum())
        np.testing.assert_allclose(surviving_load_after_worker_loss(load, p), want)

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

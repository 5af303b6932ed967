"""LoadWindow / DecayedLoad and the rebalance policy's hysteresis."""

import numpy as np
import pytest

from placement.policy import PolicyConfig, PolicyState, PolicyStats, decide, decision_metric
from placement.stats import DecayedLoad, LoadWindow, load_shift


def test_window_keeps_the_last_steps_and_is_immutable():
    empty = LoadWindow(3)
    w = empty
    for step in range(5):
        w = w.update(np.full((1, 2), float(step)))
    assert w.steps == 3 and np.allclose(w.load_LE, [[2 + 3 + 4] * 2])
    with pytest.raises(ValueError):
        _ = empty.load_LE
    multi = LoadWindow(4).update(np.ones((1, 1)), steps=3).update(np.ones((1, 1)) * 2, steps=2)
    assert multi.steps == 5 and multi.load_LE[0, 0] == 3  # older chunk still needed for 4 steps


def test_decayed_load_half_life():
    d = DecayedLoad(half_life_steps=2).update(np.array([[8.0]]))
    d2 = d.update(np.zeros((1, 1)), steps=2)
    assert d2.load_LE[0, 0] == pytest.approx(4.0) and d.load_LE[0, 0] == 8.0
    with pytest.raises(ValueError):
        d.update(-np.ones((1, 1)))
    # steps' worth of counts it holds, decayed alike: 2 steps of weight 1/2 after 2 more steps of 0
    assert d.effective_steps == 1 and d2.effective_steps == pytest.approx(0.5 + 2)
    steady = DecayedLoad(half_life_steps=3)
    for _ in range(60):
        steady = steady.update(np.array([[12.0]]), steps=4)
    assert steady.load_LE[0, 0] / steady.effective_steps == pytest.approx(3.0)  # a per-step load


def test_policy_hysteresis_cooldown_and_min_tokens():
    config = PolicyConfig(min_gain=1.1, cooldown_s=10, min_tokens=100, confirmations=2)
    calls = []

    def predicted():
        calls.append(1)
        return np.array([1.0, 1.0])

    good = PolicyStats(current_imbalance=np.array([1.3, 1.5]), predicted_imbalance=predicted, tokens=1000)
    d, s = decide(PolicyState(), PolicyStats(1.5, predicted, tokens=10), 0.0, config)
    assert not d.rebalance and "tokens" in d.reason and not calls  # lazy prediction not computed
    d, s = decide(s, good, 1.0, config)
    assert not d.rebalance and s.streak == 1
    d, s = decide(s, good, 2.0, config)
    assert d.rebalance and d.gain == pytest.approx(1.4) and s.last_rebalance_s == 2.0
    d, s2 = decide(s, good, 5.0, config)
    assert not d.rebalance and "cooldown" in d.reason
    small = PolicyStats(current_imbalance=1.05, predicted_imbalance=1.0, tokens=1000)
    d, s3 = decide(s, small, 20.0, config)
    assert not d.rebalance and s3.streak == 0
    with pytest.raises(ValueError):
        PolicyConfig(min_gain=0.9)


def test_load_shift_is_zero_for_one_shape_and_one_for_disjoint_loads_and_decision_metric_averages():
    a_LE = np.array([[4.0, 0.0, 0.0], [1.0, 1.0, 2.0]])
    assert load_shift(a_LE, 10 * a_LE) == 0.0  # the scale does not matter, the shape does
    assert load_shift(np.array([[1.0, 0.0]]), np.array([[0.0, 3.0]])) == 1.0
    assert load_shift(a_LE, np.zeros_like(a_LE)) == 0.5  # against no load: half of a's distribution, each layer
    assert decision_metric(np.array([1.0, 1.5, 2.5])) == 0.5 * (5.0 / 3 + 2.5)

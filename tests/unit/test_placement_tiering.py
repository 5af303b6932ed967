"""placement/tiering.py: the step-time model of a host tier and the tiering policy (fake clock)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from placement.tiering import TierConfig, TierRates, TierState, decide_tiers, hottest, initial_tiers, step_seconds

RATES = TierRates(device_row_s=1e-6, host_row_s=2e-5, pcie_bytes_per_s=25e9, expert_bytes=3 * 4096 * 14336 * 2,
                  row_bytes=4096 * 2, device_floor_s=5e-5)


def test_hottest_resident_is_the_best_set_for_fetch_and_for_a_host_bound_step():
    rng = np.random.default_rng(0)
    checked_host = 0
    for _ in range(40):
        rows = rng.zipf(1.6, 8).astype(float)
        for budget in (2, 4):
            resident = hottest(rows, budget)
            cold_rows = rows[~resident].sum() * (RATES.host_row_s + 2 * RATES.row_bytes / RATES.pcie_bytes_per_s)
            if cold_rows >= RATES.device_floor_s + rows[resident].sum() * RATES.device_row_s:
                # host-bound (the usual case: a host row costs 20x a device row here): hottest is best
                brute = min(step_seconds(rows, np.isin(np.arange(8), list(c)), RATES)
                            for c in itertools.combinations(range(8), budget))
                assert step_seconds(rows, resident, RATES) == pytest.approx(brute)
                checked_host += 1
            ours_fetch = step_seconds(rows, hottest(rows, budget), RATES, mode="fetch")
            assert ours_fetch == pytest.approx(min(step_seconds(rows, np.isin(np.arange(8), list(c)), RATES, "fetch")
                                                   for c in itertools.combinations(range(8), budget)))
    assert checked_host >= 40


def test_step_seconds_by_hand():
    rows, resident = np.array([100.0, 10.0, 0.0]), np.array([True, False, False])
    device = 5e-5 + 100 * 1e-6
    host = 10 * (2e-5 + 2 * 8192 / 25e9)
    assert step_seconds(rows, resident, RATES) == pytest.approx(max(device, host))
    # fetch: one touched cold expert (the idle one is not fetched), its rows on the device
    assert step_seconds(rows, resident, RATES, "fetch") == pytest.approx(device + 10e-6 + RATES.expert_bytes / 25e9)
    with pytest.raises(ValueError, match="mode"):
        step_seconds(rows, resident, RATES, "disk")


def test_rates_name_the_bad_value():
    with pytest.raises(ValueError, match="host_row_s"):
        TierRates(1e-6, float("nan"), 25e9, 1.0, 1.0)


def test_noise_below_the_margin_moves_nothing_and_a_drift_promotes_after_the_cooldown():
    config = TierConfig(budget=2, margin=0.2, max_swaps=1, cooldown_s=5.0)
    load = np.array([[100.0, 90.0, 80.0, 10.0]])
    state = initial_tiers(load, config)
    assert state.resident_LX.tolist() == [[True, True, False, False]]
    noisy = np.array([[95.0, 85.0, 99.0, 10.0]])  # expert 2 now beats 1, but by less than 20%
    decision, same = decide_tiers(state, noisy, now=0.0, config=config)
    assert not decision.changes and same is state
    drifted = np.array([[10.0, 70.0, 99.0, 150.0]])  # 3 and 2 are hot now, 0 went cold
    decision, state = decide_tiers(state, drifted, now=1.0, config=config)
    assert decision.promoted == ((0, 3),) and decision.demoted == ((0, 0),)  # max_swaps = 1
    assert state.resident_LX.tolist() == [[False, True, False, True]] and state.last_change_s == 1.0
    decision, held = decide_tiers(state, drifted, now=3.0, config=config)
    assert decision.reason == "cooldown" and held is state
    decision, state = decide_tiers(state, drifted, now=6.5, config=config)
    assert decision.promoted == ((0, 2),) and decision.demoted == ((0, 1),)
    decision, _ = decide_tiers(state, drifted, now=20.0, config=config)
    assert not decision.changes  # settled: the two hottest are resident


def test_decide_tiers_checks_shapes_and_config():
    with pytest.raises(ValueError, match="shape"):
        decide_tiers(TierState(np.zeros((1, 3), dtype=bool)), np.zeros((1, 4)), 0.0, TierConfig(budget=1))
    with pytest.raises(ValueError, match="TierConfig"):
        TierConfig(budget=1, max_swaps=0)

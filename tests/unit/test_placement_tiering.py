"""placement/tiering.py: the step-time model of a host tier and the tiering policy (fake clock)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from placement import Placement
from placement.tiering import (
    TierConfig,
    TierPlan,
    TierRates,
    TierState,
    arrange_tiers,
    decide_tiers,
    hottest,
    initial_tiers,
    placement_tiers,
    slot_loads,
    split_cold,
    split_cold_steps,
    step_seconds,
    swap_slots,
)

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


def test_step_seconds_auto_with_a_host_margin_is_its_split_or_fetch_only():
    import dataclasses

    fast_copies = dataclasses.replace(RATES, pcie_bytes_per_s=100 * RATES.pcie_bytes_per_s)  # splits gain ~30-50%
    rng = np.random.default_rng(3)
    turned = 0
    for _ in range(30):
        rows = rng.integers(0, 40, size=8).astype(np.float64)
        resident = hottest(rows, int(rng.integers(0, 8)))
        free, fetch = (step_seconds(rows, resident, fast_copies, mode) for mode in ("auto", "fetch"))
        margined = step_seconds(rows, resident, fast_copies, "auto", host_margin=0.3)
        assert margined in (pytest.approx(free), pytest.approx(fetch))
        assert free - 1e-15 <= margined <= fetch + 1e-15
        turned += margined != pytest.approx(free)
    assert turned  # some splits gain less than the margin: fetch only


def test_step_seconds_by_hand():
    rows, resident = np.array([100.0, 10.0, 0.0]), np.array([True, False, False])
    device = 5e-5 + 100 * 1e-6
    host = 10 * (2e-5 + 2 * 8192 / 25e9)
    assert step_seconds(rows, resident, RATES) == pytest.approx(max(device, host))
    # fetch: the cold expert with a mean of 10 rows is touched with probability 1 - e^-10 (the idle
    # one never), its rows on the device
    touched = 1 - np.exp(-10.0)
    assert step_seconds(rows, resident, RATES, "fetch") == pytest.approx(device + 10e-6 + touched * RATES.expert_bytes / 25e9)
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


# ---- placements: a slot's tier is its position on its worker --------------------------------------


def two_workers() -> Placement:
    # 2 layers, 6 experts, 2 workers x 4 slots; expert 1 replicated in layer 0, a free slot in layer 1
    return Placement(np.array([[0, 1, 2, 3, 4, 5, 1, 0],
                               [5, 4, 3, -1, 2, 1, 0, -1]]), 6, 4, version=3).validate()


def test_slot_loads_split_a_replicas_load_and_leave_free_slots_empty():
    load_LE = np.array([[10.0, 8, 6, 4, 2, 1], [1, 2, 3, 4, 5, 6]])
    p = two_workers()
    w0 = slot_loads(p, load_LE, 0)
    assert w0[0].tolist() == pytest.approx([5.0, 4.0, 6.0, 4.0])  # experts 0 and 1 have two replicas each
    assert w0[1].tolist() == pytest.approx([6.0, 5.0, 4.0, 0.0])
    total = slot_loads(p, load_LE, 0).sum(axis=1) + slot_loads(p, load_LE, 1).sum(axis=1)
    assert total == pytest.approx(load_LE.sum(axis=1))


def test_swap_slots_moves_experts_within_a_worker_and_refuses_across():
    p = two_workers()
    q = swap_slots(p, [(0, 0, 3), (1, 5, 7)])
    assert q.version == 4 and q.phy2log[0].tolist() == [3, 1, 2, 0, 4, 5, 1, 0]
    assert q.phy2log[1].tolist() == [5, 4, 3, -1, 2, -1, 0, 1]
    q.validate()
    np.testing.assert_array_equal(q.logcnt, p.logcnt)  # nothing replicated or lost
    with pytest.raises(ValueError, match="slots 3 and 4 are on different workers"):
        swap_slots(p, [(0, 3, 4)])


def test_arrange_tiers_puts_the_hottest_first_with_the_fewest_moves():
    load_LE = np.array([[1.0, 2, 3, 9, 5, 6], [9, 2, 3, 4, 5, 7]])  # no ties
    p = two_workers()
    q = arrange_tiers(p, load_LE, budget=2)
    assert q.version == p.version  # a planner's placement, rearranged, not a new step
    # slots moved per (worker, layer): two swaps, none (already arranged), none, one swap
    want_moved = {(0, 0): 4, (1, 0): 0, (0, 1): 0, (1, 1): 2}
    for worker in range(2):
        before, after = slot_loads(p, load_LE, worker), slot_loads(q, load_LE, worker)
        for layer in range(2):
            assert sorted(after[layer]) == sorted(before[layer])
            assert after[layer, :2].min() >= after[layer, 2:].max()  # hottest in the device slots
            moved = (q.slots_of_worker(worker)[layer] != p.slots_of_worker(worker)[layer]).sum()
            assert moved == want_moved[worker, layer]
    assert q.phy2log[0, :4].tolist() == [2, 3, 0, 1] and q.phy2log[1, 4:].tolist() == [2, 0, 1, -1]
    assert arrange_tiers(q, load_LE, budget=2) is q  # already arranged: unchanged


def test_placement_tiers_margin_cooldown_and_modelled_gain():
    p = Placement(np.array([[0, 1, 2, 3]]), 4, 4)
    cfg = TierConfig(budget=2, margin=0.2, max_swaps=2, cooldown_s=5.0, min_gain=0.05, mode="host")
    load_LE = np.array([[10.0, 10, 11, 40]])  # expert 3 is hot on the host, expert 2 within the margin
    plan, last = placement_tiers(p, load_LE, 10.0, now=100.0, config=cfg, last_change_s=None, rates=RATES)
    assert isinstance(plan, TierPlan) and plan.promotions == 1 and last == 100.0
    assert plan.placement.phy2log[0].tolist() == [3, 1, 2, 0]  # the coolest resident (0, ties low) leaves
    before, after = plan.predicted_step_s[0][1:]
    assert after < before
    again, last2 = placement_tiers(plan.placement, load_LE, 10.0, now=103.0, config=cfg, last_change_s=last, rates=RATES)
    assert again.placement is None and again.reason == "tier cooldown" and last2 == 100.0
    settled, _ = placement_tiers(plan.placement, load_LE, 10.0, now=200.0, config=cfg, last_change_s=last, rates=RATES)
    assert settled.placement is None  # the swapped-out expert (10) does not clear the margin over 11 / 10
    # a swap that clears the margin but gains nothing modelled: a device-bound step (host rows free)
    free_host = TierRates(device_row_s=1e-3, host_row_s=1e-9, pcie_bytes_per_s=1e12, expert_bytes=1.0, row_bytes=1.0)
    none, last3 = placement_tiers(p, load_LE, 10.0, now=100.0, config=cfg, last_change_s=None, rates=free_host)
    assert none.placement is None and last3 is None


def test_placement_tiers_swaps_must_repay_their_copies_within_payback_steps():
    import dataclasses

    from placement.tiering import swap_seconds

    p = Placement(np.array([[0, 1, 2, 3]]), 4, 4)
    load_LE = np.array([[10.0, 10, 11, 40]])  # one promotion (expert 3) clears the margin
    cfg = TierConfig(budget=2, margin=0.2, max_swaps=2, cooldown_s=0.0, min_gain=0.0, mode="host")
    plan, _ = placement_tiers(p, load_LE, 10.0, now=0.0, config=cfg, last_change_s=None, rates=RATES)
    _, before, after = plan.predicted_step_s[0]
    copies_s = swap_seconds(1, RATES)
    assert copies_s == pytest.approx(2 * RATES.expert_bytes / RATES.pcie_bytes_per_s)
    repays_in = copies_s / (before - after)  # steps of the modelled gain one swap's copies cost
    short = dataclasses.replace(cfg, payback_steps=0.9 * repays_in)
    blocked, last = placement_tiers(p, load_LE, 10.0, now=0.0, config=short, last_change_s=None, rates=RATES)
    assert blocked.placement is None and last is None and "repaid within" in blocked.reason
    long = dataclasses.replace(cfg, payback_steps=1.1 * repays_in)
    kept, _ = placement_tiers(p, load_LE, 10.0, now=0.0, config=long, last_change_s=None, rates=RATES)
    assert kept.placement is not None and kept.promotions == 1
    # without measured rates there is nothing to repay in: the margin alone decides
    unmeasured, _ = placement_tiers(p, load_LE, 10.0, now=0.0, config=short, last_change_s=None, rates=None)
    assert unmeasured.placement is not None
    with pytest.raises(ValueError, match="invalid TierConfig"):
        TierConfig(budget=2, payback_steps=-1.0)


def test_a_sharded_placement_cannot_be_tiered():
    sharded = Placement(np.array([[0, 1, 0, 2]]), 3, 2, shard_width=np.array([[0.5, 1, 0.5, 1]])).validate()
    assert sharded.is_sharded
    with pytest.raises(ValueError, match="whole experts"):
        swap_slots(sharded, [(0, 0, 1)])


def test_overlap_and_expected_touches():
    import dataclasses

    shared = dataclasses.replace(RATES, overlap=0.0, host_expert_s=1e-4)
    assert shared.concurrent(3.0, 1.0) == 4.0 and RATES.concurrent(3.0, 1.0) == 3.0
    assert dataclasses.replace(RATES, overlap=0.5).concurrent(3.0, 1.0) == 3.5
    with pytest.raises(ValueError, match="overlap must be in"):
        dataclasses.replace(RATES, overlap=1.5)
    # a rarely routed expert (0.1 rows per step) is touched one step in ~10: its fixed cost counts so
    assert shared.host_seconds(np.array([0.1]), expected=True) == pytest.approx(
        -np.expm1(-0.1) * 1e-4 + 0.1 * (2e-5 + 2 * 8192 / 25e9))
    assert shared.host_seconds(np.array([0.1])) == pytest.approx(1e-4 + 0.1 * (2e-5 + 2 * 8192 / 25e9))
    # no overlap: splitting between fetch and host gains nothing, so the cheaper path per expert takes all
    rows = np.array([3.0, 3.0, 3.0])
    cheap_fetch = dataclasses.replace(shared, pcie_bytes_per_s=1e13)  # 35 us a fetch, 160 us on the host
    assert split_cold(rows, cheap_fetch, device_s=0.0).all()


def test_host_curve_interpolates_extrapolates_and_replaces_the_affine_model():
    import dataclasses

    # weight streaming up to 16 rows (1 ms flat), then the matmul rate: 0.1 ms per row past 16
    curved = dataclasses.replace(RATES, host_curve_rows=(1.0, 16.0, 64.0), host_curve_s=(1e-3, 1e-3, 5.8e-3))
    cost = curved.host_expert_seconds(np.array([0.0, 1.0, 8.0, 40.0, 64.0, 164.0]))
    assert cost == pytest.approx([0.0, 1e-3, 1e-3, 3.4e-3, 5.8e-3, 15.8e-3])
    moved = 2 * RATES.row_bytes / RATES.pcie_bytes_per_s
    assert curved.host_seconds(np.array([8.0, 164.0])) == pytest.approx(1e-3 + 15.8e-3 + 172 * moved)
    # expected touches: an expert touched with probability p carries rows / p when touched
    p = -np.expm1(-0.5)
    assert curved.host_seconds(np.array([0.5]), expected=True) == pytest.approx(p * 1e-3 + 0.5 * moved)
    # the learnt scale multiplies the host's cost and nothing else
    assert dataclasses.replace(curved, host_scale=2.0).host_expert_seconds(np.array([40.0])) == pytest.approx([6.8e-3])
    # at prefill sizes the curve sends the experts to fetch that the affine (decode-measured) model keeps on the host
    affine = dataclasses.replace(RATES, host_row_s=1e-7, host_expert_s=1e-3)
    prefill = dataclasses.replace(affine, host_curve_rows=(1.0, 16.0, 512.0), host_curve_s=(1e-3, 1.2e-3, 0.1))
    rows = np.array([512.0, 512.0, 512.0, 512.0])
    assert split_cold(rows, affine, device_s=1e-4).sum() < 4
    assert split_cold(rows, prefill, device_s=1e-4).all()


@pytest.mark.parametrize("rows, secs, bad", [((1.0, 4.0), (1e-3,), "one length"), ((4.0, 1.0), (1e-3, 2e-3), "ascending"),
                                             ((0.0, 4.0), (1e-3, 2e-3), "ascending"), ((1.0, 4.0), (1e-3, float("nan")), "nan")])
def test_host_curve_names_the_bad_value(rows, secs, bad):
    import dataclasses

    with pytest.raises(ValueError, match=bad):
        dataclasses.replace(RATES, host_curve_rows=rows, host_curve_s=secs)
    with pytest.raises(ValueError, match="host_scale"):
        dataclasses.replace(RATES, host_scale=0.0)
    with pytest.raises(ValueError, match="host_start_s.*-0.001"):
        dataclasses.replace(RATES, host_start_s=-1e-3)


@pytest.mark.parametrize("host_start_s,host_margin,host_bias",
                         [(0.0, 0.0, 1.0), (0.01, 0.0, 1.0), (0.0, 0.15, 1.0), (0.0, 0.0, 1.6), (0.002, 0.1, 0.7)])
@pytest.mark.parametrize("expected", [False, True])
def test_split_cold_is_the_best_prefix_of_the_slow_reference(expected, host_start_s, host_margin, host_bias):
    import dataclasses

    rng = np.random.default_rng(5)
    curved = dataclasses.replace(RATES, overlap=0.6, host_curve_rows=(1.0, 16.0, 256.0), host_curve_s=(4e-3, 5e-3, 40e-3),
                                 host_start_s=host_start_s)
    for case in range(40):
        rows = rng.integers(0, 300, size=int(rng.integers(1, 9))).astype(np.float64) * (rng.random(1) < 0.8)
        device_s = float(rng.random() * 0.05)
        fetch = split_cold(rows, curved, device_s, expected, host_margin=host_margin, host_bias=host_bias)

        def step(mask):
            host_s = curved.host_seconds(rows[~mask], expected)
            modelled = curved.concurrent(device_s + curved.fetch_seconds(rows[mask], expected), host_s)
            return host_bias * modelled if host_s > 0 else modelled  # a step with host math, weighed

        # the slow reference: every prefix of the most-loaded-first order, one at a time
        order = np.lexsort((np.arange(len(rows)), -rows))
        best, best_mask = None, None
        for k in range(int((rows > 0).sum()) + 1):
            mask = np.zeros(len(rows), dtype=bool)
            mask[order[:k]] = True
            if best is None or step(mask) < best - 1e-15:
                best, best_mask = step(mask), mask
        every = rows > 0  # the margin: a split that keeps anything on the host must beat fetching all by it
        if best > (1 - host_margin) * step(every):
            best, best_mask = step(every), every
        assert step(fetch) == pytest.approx(best, rel=1e-9), case
        assert fetch.tolist() == best_mask.tolist(), case
        assert not fetch[rows == 0].any()


@pytest.mark.parametrize("host_bias,host_margin", [(1.0, 0.0), (2.5, 0.0), (1.0, 0.3), (0.5, 0.1)])
def test_split_cold_steps_are_the_modelled_steps_of_its_split_and_of_fetching_all(host_bias, host_margin):
    """The steps split_cold_steps hands back equal the split's and fetch-everything's modelled by
    hand (TierRates.concurrent of the two parts), awkward rows included (untouched, one row, many)."""
    rates = TierRates(device_row_s=1e-6, host_row_s=3e-6, pcie_bytes_per_s=1e9, expert_bytes=6e3, row_bytes=48,
                      host_expert_s=2e-6, overlap=0.7, host_start_s=1e-6)
    rng = np.random.default_rng(5)
    for _ in range(30):
        rows_X = rng.choice([0, 0, 1, 2, 5, 40], size=int(rng.integers(1, 9)))
        device_s = float(rng.uniform(0, 1e-4))
        split = split_cold_steps(rows_X, rates, device_s, host_margin=host_margin, host_bias=host_bias)
        assert split.fetch_X.tolist() == split_cold(rows_X, rates, device_s, host_margin=host_margin,
                                                    host_bias=host_bias).tolist()
        fetch_X = split.fetch_X
        want = rates.concurrent(device_s + rates.fetch_seconds(rows_X[fetch_X]), rates.host_seconds(rows_X[~fetch_X]))
        assert split.step_s == pytest.approx(want, rel=1e-9, abs=1e-15)
        assert split.fetch_all_s == pytest.approx(device_s + rates.fetch_seconds(rows_X), rel=1e-9, abs=1e-15)

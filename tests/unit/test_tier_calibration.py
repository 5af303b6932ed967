"""What a host tier learns of its own costs (moeray.tier_calibration): the host math's measured
over modelled time, each layer step's length (LayerSpan) and the split bias learnt from them,
alone and through the real layer path on a CPU worker."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from moeray.comm.dispatcher import LocalDispatcher
from moeray.host_tier import ColdPath, HostSlots
from moeray.tier_calibration import HostCalibration, LayerSpan
from placement import Placement
from placement.tiering import split_cold
from tests.unit.test_dispatch import dense_reference, weights_and_inputs
from tests.unit.test_host_tier import RATES, D, F, tiered_layer


def test_host_calibration_learns_the_measured_ratio_and_resets_with_the_path():
    calibration = HostCalibration(weight=0.5)
    rows = np.array([4.0, 8.0])
    modelled = float(RATES.host_expert_seconds(rows).sum())
    for _ in range(20):
        calibration.observe(RATES, rows, 3.0 * modelled)
    assert calibration.scale == pytest.approx(3.0, rel=1e-3)
    scaled = calibration.rates(RATES)
    assert scaled.host_scale == pytest.approx(3.0, rel=1e-3) and calibration.rates(RATES) is scaled  # reused
    calibration.observe(RATES, rows, 1e6 * modelled)  # one odd step moves it by at most the clip
    assert calibration.scale <= 3.0 + 0.5 * (16.0 - 3.0) + 1e-9
    for _ in range(20):
        calibration.observe(RATES, rows, 3.0 * modelled, start_s=2e-3)  # the host's start cost
    assert calibration.rates(RATES).host_start_s == pytest.approx(2e-3, rel=1e-3)
    calibration.observe(RATES, rows, 3.0 * modelled, start_s=50.0)  # clipped at longest_start_s (0.05 s)
    assert calibration.start_s == pytest.approx(2e-3 + 0.5 * (0.05 - 2e-3))
    started = dataclasses.replace(RATES, host_start_s=1e-3)  # what was learnt adds to the rates' own
    assert calibration.rates(started).host_start_s == pytest.approx(1e-3 + calibration.start_s)
    scale, start = calibration.scale, calibration.start_s
    for _ in range(100):  # steps that left every slot to fetch: what was learnt fades toward the rates
        calibration.fade()
    assert 1.0 < calibration.scale < 1.0 + 0.2 * (scale - 1.0) and 0 < calibration.start_s < 0.2 * start
    layer = HostSlots(torch.zeros(2, 2 * F, D), torch.zeros(2, D, F), 1, torch.device("cpu"), ColdPath("auto", RATES))
    layer._calibration.scale = 5.0
    layer.path = ColdPath("auto", RATES)
    assert layer._calibration.scale == 1.0


def test_split_bias_skips_each_kinds_warm_up_and_an_unobserved_kind_keeps_the_models_ratio():
    calibration = HostCalibration(weight=0.5)
    calibration.observe_step(16e-3, 1e-3, split=True)  # a warm-up step (a compile): counted, not learnt
    assert (calibration.split_steps, calibration.split_ratio, calibration.split_bias) == (1, 1.0, 1.0)
    calibration.observe_step(3e-3, 1e-3, split=True)
    # splits run 2x their model, fetch-only steps unobserved (the model's 1): the bias turns toward fetching
    assert calibration.split_ratio == pytest.approx(2.0) and calibration.split_bias == pytest.approx(2.0)
    calibration.observe_step(0.1e-3, 1e-3, split=False)  # the fetch-only kind's warm-up
    assert calibration.fetch_ratio == 1.0 and calibration.fetch_steps == 1
    calibration.observe_step(2e-3, 1e-3, split=False)  # fetching runs long too: the bias falls back
    assert calibration.fetch_ratio == pytest.approx(1.5) and calibration.split_bias == pytest.approx(2.0 / 1.5)


def test_split_bias_learns_measured_over_modelled_steps_within_its_clip_and_fades():
    calibration = HostCalibration(weight=0.5, warmup_steps=0)
    assert calibration.split_bias == 1.0
    for _ in range(30):  # steps with host math run 3x their model, fetch-only ones 1.5x
        calibration.observe_step(3e-3, 1e-3, split=True)
        calibration.observe_step(1.5e-3, 1e-3, split=False)
    assert calibration.split_bias == pytest.approx(2.0, rel=1e-6)
    calibration.observe_step(1.0, 1e-3, split=True)  # one odd step (a compile) moves it by at most the step clip
    assert calibration.split_ratio == pytest.approx(3.0 + 0.5 * (4.0 - 3.0))
    calibration.observe_step(1e-9, 1e-3, split=False)  # and the other way
    assert calibration.fetch_ratio == pytest.approx(1.5 + 0.5 * (0.25 - 1.5))
    before = calibration.split_ratio, calibration.fetch_ratio, calibration.split_steps, calibration.fetch_steps
    calibration.observe_step(float("nan"), 1e-3, split=True)  # not a measurement: ignored
    calibration.observe_step(float("inf"), 1e-3, split=True)
    calibration.observe_step(1e-3, 0.0, split=False)  # nothing modelled (no host slot planned): ignored
    assert (calibration.split_ratio, calibration.fetch_ratio, calibration.split_steps, calibration.fetch_steps) == before
    for _ in range(300):  # steps that fetched everything: the split's bias fades toward none
        calibration.fade()
    assert calibration.split_bias == pytest.approx(1.0, abs=0.05) and calibration.fetch_ratio == before[1]


def test_layer_span_on_a_cpu_worker_reads_its_step_at_once():
    span = LayerSpan(torch.device("cpu"))
    assert span.end("none begun") is None
    span.begin()
    sum(range(10000))
    seconds, tag = span.end("step")
    assert tag == "step" and 0 < seconds < 5
    assert span.end("again") is None and span.collect() is None  # one reading per begin


def test_a_learnt_split_bias_turns_host_bets_into_fetches_and_the_steps_teach_it(monkeypatch):
    """With host math measured slow against its model (split_bias > 1) a split that left slots on
    the host fetches them all; learn_split off ignores it. Every auto step on a CPU worker that
    plans anything is timed and observed; one that plans nothing (its rows on device slots, or on
    host slots a prefetch has on the device already) is not timed at all."""
    from moeray.tier_staging import Prefetch

    begun = []
    monkeypatch.setattr(LayerSpan, "begin", lambda span, original=LayerSpan.begin: (begun.append(1), original(span)))
    experts = 6
    w13_EHD, w2_EDF, _ = weights_and_inputs(7, experts, 1, [0], D, F)
    x_TD = torch.randn(4, D, generator=torch.Generator().manual_seed(7))
    placement = Placement(np.arange(experts)[None], experts, experts)
    few_TK = torch.tensor([[3], [4], [4], [5]])  # by RATES: fetch the 2-row slot, host the 1-row ones
    on_device_TK = torch.tensor([[0], [1], [1], [0]])  # device slots only
    on_slot_zero_TK = torch.tensor([[2], [2], [0], [1]])  # host slot 0 (expert 2) and device slots
    w_TK = torch.ones(4, 1)
    for learn_split, fetched, hosted in ((False, 1, 2), (True, 3, 0)):
        begun.clear()
        layer = tiered_layer(placement, 0, LocalDispatcher(experts), w13_EHD, w2_EDF, 2,
                             ColdPath("auto", RATES, learn_split=learn_split, split_trial=False))
        host, calibration = layer.host, layer.host._calibration
        calibration.start_s = 1e-6
        calibration.fetch_steps = 1  # as if learnt: fetch-only steps past their warm-up,
        calibration.split_ratio = 8.0  # steps with host math 8x slower than modelled
        assert host.split_bias == (8.0 if learn_split else 1.0)
        torch.testing.assert_close(layer(x_TD, few_TK, w_TK), dense_reference(x_TD, few_TK, w_TK, w13_EHD, w2_EDF),
                                   rtol=1e-5, atol=1e-5)
        assert (host.counts.fetched_experts, host.counts.host_experts) == (fetched, hosted), learn_split
        # the step was timed and observed (fetched all: fetch_ratio moved) only where learning is on
        assert (calibration.fetch_ratio != 1.0, calibration.fetch_steps) == ((True, 2) if learn_split else (False, 1))
        assert len(begun) == learn_split
        for routed_TK in (on_device_TK, on_slot_zero_TK):
            if routed_TK is on_slot_zero_TK:  # host slot 0's weights already on the device: nothing to plan
                buffer, ready = host.pool.copy_round(host, [(0, 0)])
                host.pool.prefetched = Prefetch(host, [0], buffer, ready)
            torch.testing.assert_close(layer(x_TD, routed_TK, w_TK),
                                       dense_reference(x_TD, routed_TK, w_TK, w13_EHD, w2_EDF), rtol=1e-5, atol=1e-5)
        assert host.counts.prefetched == 1 and len(begun) == learn_split  # neither step was timed
    assert split_cold(np.array([0, 2, 1, 1]), RATES, 0.0, host_bias=8.0).tolist() == [False, True, True, True]

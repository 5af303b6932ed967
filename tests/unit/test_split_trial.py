"""The split trial (placement.split_trial, pure) and a worker's SplitTrial through the real layer
path on a CPU worker: where the proposed splits run longer than fetching everything the layers
stop playing them, where they run shorter they keep them, and either way the output is the
reference's."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from moeray.comm.dispatcher import LocalDispatcher
from moeray.host_tier import ColdPath, HostSlots
from moeray.tier_calibration import LayerSpan, SplitTrial
from placement import Placement
from placement.split_trial import TrialConfig, TrialState, choose, learning, observe
from tests.unit.test_dispatch import dense_reference, weights_and_inputs
from tests.unit.test_host_tier import RATES, D, F, tiered_layer

# copies slow against the host math (even as a CPU worker's calibration learns the host's real,
# slower speed): the rates propose leaving every touched slot on the host, every step
SLOW_COPIES = dataclasses.replace(RATES, pcie_bytes_per_s=1e6)
CONFIG = TrialConfig(window=5, min_observed=3, warmup=1, explore_every=4, explore_clear_every=16, clear=0.25,
                     hysteresis=0.05)


def observed(state: TrialState, split: bool, *ratios: float) -> TrialState:
    for ratio in ratios:
        state = observe(state, split, ratio, CONFIG)
    return state


def test_the_arms_play_at_even_odds_until_each_has_enough_kept_ratios_warm_up_dropped():
    state = TrialState()
    assert learning(state, CONFIG) and choose(state, 0.49, CONFIG) and not choose(state, 0.5, CONFIG)
    state = observed(state, True, 50.0, 1.0, 1.0, 1.0)  # the first (a compile) is seen, not kept
    assert state.split_seen == 4 and state.split_ratios == (1.0, 1.0, 1.0)
    assert learning(state, CONFIG)  # the fetch arm has nothing yet
    state = observed(state, False, 0.5, 0.5, 0.5)
    assert learning(state, CONFIG) and len(state.fetch_ratios) == 2
    state = observed(state, False, 0.5)
    assert not learning(state, CONFIG) and not state.prefer_split  # fetching measured shorter
    state = observed(state, True, *[1.0] * 10)
    assert len(state.split_ratios) == CONFIG.window  # the latest only


def test_the_lower_median_is_preferred_past_the_hysteresis_and_one_odd_step_does_not_flip_it():
    state = observed(TrialState(), True, 9.0, 1.0, 1.0, 1.0)
    state = observed(state, False, 9.0, 0.97, 0.97, 0.97)  # 3% shorter: within the hysteresis
    assert state.prefer_split
    state = observed(state, False, 0.9, 0.9)  # median 0.97 still (0.97, 0.97, 0.97, 0.9, 0.9)
    assert state.prefer_split
    state = observed(state, False, 0.9)
    assert not state.prefer_split and state.median(False) == pytest.approx(0.9)
    state = observed(state, True, 0.1)  # one step at a tenth: the split's median stays 1
    assert not state.prefer_split and state.median(True) == 1.0
    state = observed(state, True, 0.5, 0.5)
    assert state.prefer_split  # its median fell to 0.5
    assert observe(state, True, float("nan"), CONFIG) is state and observe(state, False, 0.0, CONFIG) is state


def test_the_other_arm_is_explored_about_once_in_explore_every_and_less_where_it_is_clearly_worse():
    close = observed(observed(TrialState(), True, 9.0, 1.0, 1.0, 1.0), False, 9.0, 1.1, 1.1, 1.1)
    assert close.prefer_split
    coins = np.random.default_rng(0).random(4000)
    explored = np.mean([not choose(close, float(c), CONFIG) for c in coins])
    assert explored == pytest.approx(1 / CONFIG.explore_every, abs=0.02)
    clear = observed(observed(TrialState(), True, 9.0, 1.0, 1.0, 1.0), False, 9.0, 2.0, 2.0, 2.0)
    explored = np.mean([not choose(clear, float(c), CONFIG) for c in coins])
    assert explored == pytest.approx(1 / CONFIG.explore_clear_every, abs=0.01)


@pytest.mark.parametrize("bad,named", [(dict(window=2, min_observed=3), "min_observed"),
                                       (dict(explore_every=1), "explore_every 1"),
                                       (dict(hysteresis=1.0), "hysteresis 1.0")])
def test_a_bad_trial_config_is_refused_by_name(bad, named):
    with pytest.raises(ValueError, match=named):
        TrialConfig(**bad)


@pytest.mark.parametrize("slow", ["host", "fetch"])
def test_a_workers_layers_keep_to_the_arm_that_measured_shorter_and_stay_exact(monkeypatch, slow):
    """Three layers of one worker share a SplitTrial; the rates propose a split every step (all 3
    touched slots on the host). The steps' readings are made up (LayerSpan.end, the CPU path's
    clock): the slow arm's steps measure 2x the model's fetch-everything length, the other's
    0.5x, so the test does not hang on a loaded machine's wall clock (the GPU test times real
    steps). A step with many more rows is another bucket: it learns apart."""

    def made_up_end(span, tag):
        if span._began is None:
            return None
        span._began = None
        return tag.fetch_all_s * (2.0 if tag.split == (slow == "host") else 0.5), tag

    monkeypatch.setattr(LayerSpan, "end", made_up_end)
    experts = 6
    w13_EHD, w2_EDF, _ = weights_and_inputs(7, experts, 1, [0], D, F)
    x_TD = torch.randn(4, D, generator=torch.Generator().manual_seed(7))
    placement = Placement(np.arange(experts)[None], experts, experts)
    few_TK = torch.tensor([[3], [4], [4], [5]])
    w_TK = torch.ones(4, 1)
    want_TD = dense_reference(x_TD, few_TK, w_TK, w13_EHD, w2_EDF)
    trial = SplitTrial(TrialConfig(window=7, min_observed=4, warmup=1, explore_every=8), seed=3)
    layers = []
    for _ in range(3):
        layer = tiered_layer(placement, 0, LocalDispatcher(experts), w13_EHD, w2_EDF, 2,
                             ColdPath("auto", SLOW_COPIES, learn_split=False, split_trial=True))
        layer.host.trial = trial
        layers.append(layer)
    for _ in range(16):
        for layer in layers:
            torch.testing.assert_close(layer(x_TD, few_TK, w_TK), want_TD, rtol=1e-5, atol=1e-5)
    (bucket, view), = trial.view().items()
    assert bucket == SplitTrial.bucket(4) and not view["learning"] and view["prefer_split"] == (slow == "fetch"), view
    for layer in layers:
        layer.host.counts = type(layer.host.counts)()
    for _ in range(8):
        for layer in layers:
            torch.testing.assert_close(layer(x_TD, few_TK, w_TK), want_TD, rtol=1e-5, atol=1e-5)
    overruled = sum(layer.host.counts.overruled for layer in layers)
    steps = sum(layer.host.counts.steps for layer in layers)
    assert steps == 24
    # exploring the other arm about one step in 8: mostly the preferred one
    assert (overruled >= 18) if slow == "host" else (overruled <= 6), overruled
    if slow == "host":  # the steps the trial overruled fetched every touched slot
        assert sum(layer.host.counts.fetched_experts for layer in layers) >= 3 * overruled
    learnt = trial.view()[bucket]
    many_TK = torch.tensor([[2 + t % 4] for t in range(40)])  # 40 rows on the host slots: another octave
    x40_TD = torch.randn(40, D, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(layers[0](x40_TD, many_TK, torch.ones(40, 1)),
                               dense_reference(x40_TD, many_TK, torch.ones(40, 1), w13_EHD, w2_EDF), rtol=1e-5, atol=1e-5)
    views = trial.view()
    assert sorted(views) == [bucket, SplitTrial.bucket(40)] and views[bucket] == learnt
    assert views[SplitTrial.bucket(40)]["learning"]


def test_a_layer_without_the_trial_plays_every_proposed_split():
    experts = 6
    w13_EHD, w2_EDF, _ = weights_and_inputs(7, experts, 1, [0], D, F)
    layer = tiered_layer(Placement(np.arange(experts)[None], experts, experts), 0, LocalDispatcher(experts),
                         w13_EHD, w2_EDF, 2, ColdPath("auto", SLOW_COPIES, learn_split=False, split_trial=False))
    x_TD, few_TK, w_TK = torch.randn(4, D), torch.tensor([[3], [4], [4], [5]]), torch.ones(4, 1)
    for _ in range(12):
        layer(x_TD, few_TK, w_TK)
    counts = layer.host.counts
    assert counts.overruled == 0 and counts.host_experts == 3 * 12 and counts.fetched_experts == 0
    assert layer.host.trial.view() == {}  # never consulted nor taught

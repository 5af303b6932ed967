"""The host tier through the real layer path (moeray.host_tier via SlotExperts) against the dense
reference: every budget from no device slot to all, every cold path (host compute, on-demand
fetch in rounds, the per-step auto split), awkward sizes, and expert parallelism over Gloo ranks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from moeray.comm import local_ranks
from moeray.comm.dispatcher import AllToAllDispatcher, LocalDispatcher
from moeray.comm.slot_map import DeviceSlotMap
from moeray.expert_parallel import SlotExperts
from moeray.host_tier import ColdPath, HostSlots
from moeray.tier_counts import tier_totals
from moeray.tier_measure import measure_rates
from placement import Placement
from placement.tiering import TierRates, split_cold
from tests.helpers import random_replicated_placement
from tests.unit.test_dispatch import dense_reference, weights_and_inputs

D, F = 12, 20
# a host row costs 3 device rows, a fetch 4 host rows' worth: auto fetches a slot from ~2 rows on
RATES = TierRates(device_row_s=1e-6, host_row_s=3e-6, pcie_bytes_per_s=1e9, expert_bytes=6e3, row_bytes=48,
                  host_expert_s=2e-6)


def tiered_layer(placement, rank, dispatcher, w13_EHD, w2_EDF, budget: int, path: ColdPath) -> SlotExperts:
    mine = placement.slots_of_worker(rank)[0]
    held = torch.as_tensor(mine >= 0)[:, None, None]
    w13 = torch.where(held, w13_EHD[np.maximum(mine, 0)], 0)
    w2 = torch.where(held, w2_EDF[np.maximum(mine, 0)], 0)
    host = None if budget >= len(mine) else HostSlots(w13[budget:], w2[budget:], budget, torch.device("cpu"), path)
    return SlotExperts(w13[:budget].clone(), w2[:budget].clone(), DeviceSlotMap.from_placement(placement, 0), dispatcher,
                       placement.num_experts, kernel_impl="reference", host=host)


PATHS = [ColdPath("host", None), ColdPath("fetch", None, fetch_slots=1), ColdPath("fetch", None, fetch_slots=3),
         ColdPath("auto", RATES, fetch_slots=2), ColdPath("auto", RATES, fetch_slots=1)]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"{p.mode}{p.fetch_slots}")
@pytest.mark.parametrize("tokens,top_k", [(1, 1), (1, 3), (9, 3), (40, 2)])
def test_one_worker_every_budget_equals_the_dense_reference(path, tokens, top_k):
    experts, spw = 7, 8  # one free slot
    w13_EHD, w2_EDF, [(x, ids, w)] = weights_and_inputs(tokens * 10 + top_k, experts, top_k, [tokens], D, F)
    placement = Placement(np.array([[3, 0, 6, -1, 2, 5, 1, 4]]), experts, spw)
    want = dense_reference(x, ids, w, w13_EHD, w2_EDF)
    for budget in range(spw + 1):
        layer = tiered_layer(placement, 0, LocalDispatcher(spw), w13_EHD, w2_EDF, budget, path)
        got = layer(x, ids, w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"budget {budget}")
        assert layer.rows_S.sum().item() == tokens * top_k  # counted per slot, device and host alike


def fetch_rounds_beside_host_math_against_the_reference(device: torch.device, tol: float, hidden: int = D,
                                                        ffn: int = F, launch_thread: bool = False) -> list:
    """Rounds of one staging slot (so that past the first two each round's copies wait for the
    kernel two rounds back), queued inline or by the launch thread (moeray.tier_launch) while the
    host math runs: skewed routing makes auto (the fixed RATES) fetch several slots and compute
    several on the host in one step, with 0 and 3 resident slots. Returns each budget's TierCounts."""
    from moeray.host_tier import split_tiers
    from moeray.tier_staging import StagingPool

    experts, top_k = 12, 2
    w13_EHD, w2_EDF, _ = weights_and_inputs(5, experts, top_k, [0], hidden, ffn)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, hidden, generator=gen)
    # experts 7-11 get ~25 rows each, 0-6 two rows each (distinct top-2 per token): auto splits them;
    # the resident slots (the first experts) hold cold ones
    t = torch.arange(64)
    ids = torch.stack([7 + t % 5, torch.where(t < 14, t % 7, 7 + (t + 1) % 5)], 1)
    w = torch.rand(64, top_k, generator=gen) + 0.1
    want = dense_reference(x, ids, w, w13_EHD, w2_EDF)
    placement = Placement(np.arange(experts)[None], experts, experts)
    counts = []
    for budget in (0, 3):
        pool = StagingPool(1, device, launch_thread=launch_thread)
        # the split by the fixed RATES alone: learnt from the steps' wall time it would vary by machine
        path = ColdPath("auto", RATES, fetch_slots=1, learn_split=False)
        w13_BHD, w2_BDF, host = split_tiers(w13_EHD, w2_EDF, budget, device, path, pool)
        layer = SlotExperts(w13_BHD, w2_BDF, DeviceSlotMap.from_placement(placement, 0, device),
                            LocalDispatcher(experts), experts, host=host,
                            kernel_impl="reference" if device.type == "cpu" else "auto")
        for _ in range(2):  # the second step reuses the thread and the buffers the first one freed
            with torch.no_grad():
                got = layer(x.to(device), ids.to(device), w.to(device)).cpu()
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=f"budget {budget}")
        assert (pool._launcher is not None) == launch_thread  # started by the steps, only when asked
        pool.close()
        assert pool.launch_thread() is None
        counts.append(host.counts)
    return counts


@pytest.mark.parametrize("launch_thread", [False, True], ids=["inline", "launch_thread"])
def test_fetch_rounds_beside_the_host_math_equal_the_dense_reference(launch_thread):
    for counts in fetch_rounds_beside_host_math_against_the_reference(torch.device("cpu"), 1e-5,
                                                                      launch_thread=launch_thread):
        assert counts.fetched_experts >= 2 * 3 and counts.host_experts >= 2 * 2, counts  # rounds past two, host slots


def test_the_launch_thread_keeps_the_callers_grad_mode_and_reports_its_errors():
    from moeray.tier_launch import LaunchThread

    class Launches:
        def __init__(self, fail: bool):
            self.fail = fail

        def run(self):
            if self.fail:
                raise RuntimeError("launch failed")
            return torch.ones(2, requires_grad=True) * 2, torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    thread = LaunchThread(torch.device("cpu"))
    try:
        with torch.no_grad():
            y, grad, inference = thread.start(Launches(False)).result()
        assert not grad and not inference and not y.requires_grad
        with torch.inference_mode():
            _, grad, inference = thread.start(Launches(False)).result()
        assert inference
        with pytest.raises(RuntimeError, match="launch failed"):
            thread.start(Launches(True)).result()
        assert thread.start(Launches(False)).result()[1]  # still serving; grad on as in the caller
        import sys

        before, seen = sys.getswitchinterval(), []

        class Watched(Launches):
            def run(self):
                seen.append(sys.getswitchinterval())
                return super().run()

        thread.switch_interval_s = 2e-4
        with pytest.raises(RuntimeError, match="launch failed"), thread.beside(Watched(True)) as queued:
            seen.append(sys.getswitchinterval())  # the body: the host math's side
        assert queued.done() and seen == [pytest.approx(2e-4)] * 2 and sys.getswitchinterval() == before
    finally:
        thread.close()


def test_an_untouched_prefetch_and_the_calibration_through_layer_steps():
    """A pending prefetch none of whose slots a step touches (nothing else fetched): no kernel for
    its round, the result still the reference's. A step that leaves every touched slot to fetch
    fades what the calibration learnt; a CPU worker's host step observes no start cost."""
    from moeray.tier_staging import Prefetch

    experts = 6
    w13_EHD, w2_EDF, _ = weights_and_inputs(7, experts, 1, [0], D, F)
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(7))
    placement = Placement(np.arange(experts)[None], experts, experts)
    few = torch.tensor([[3], [4], [4], [5]])  # 1-2 rows a slot (auto fetches the 2-row slot, hosts the others)
    w = torch.ones(4, 1)
    layer = tiered_layer(placement, 0, LocalDispatcher(experts), w13_EHD, w2_EDF, 2, ColdPath("host", None))
    host = layer.host
    buffer, ready = host.pool.copy_round(host, [(0, 0)])  # host slot 0 = expert 2, which no row routes to
    host.pool.prefetched = Prefetch(host, [0], buffer, ready)
    torch.testing.assert_close(layer(x, few, w), dense_reference(x, few, w, w13_EHD, w2_EDF), rtol=1e-5, atol=1e-5)
    assert host.counts.prefetch_unused == 1 and host.counts.host_experts == 3 and host.counts.fetched_experts == 0
    host.path = ColdPath("auto", RATES, learn_split=False, split_trial=False)  # the host calibration alone (the split's: below)
    host._calibration.start_s = 1e-6  # small against the slots' costs (tens of microseconds): the split stands
    torch.testing.assert_close(layer(x, few, w), dense_reference(x, few, w, w13_EHD, w2_EDF), rtol=1e-5, atol=1e-5)
    assert host.counts.host_experts == 3 + 2 and host.counts.fetched_experts == 1
    assert host._calibration.start_s == pytest.approx(0.75e-6)  # observed 0 on a CPU worker (weight 0.25)
    many = torch.tensor([[3], [3], [3], [3]])  # 4 rows on one slot: auto fetches it, nothing on the host
    host._calibration.scale = 5.0
    torch.testing.assert_close(layer(x, many, w), dense_reference(x, many, w, w13_EHD, w2_EDF), rtol=1e-5, atol=1e-5)
    assert host.counts.fetched_experts == 1 + 1 and host._calibration.scale == pytest.approx(5.0 + 0.02 * (1.0 - 5.0))


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"{p.mode}{p.fetch_slots}")
def test_tier_totals_count_every_host_slot_row_once_and_the_bytes_fetched(path):
    """What a worker ships: over its layers, host + fetched rows are the rows its host slots got
    (rows_S counts them independently), and the copied bytes are one expert per fetch."""
    experts, spw, budget = 7, 8, 3
    placement = Placement(np.array([[3, 0, 6, -1, 2, 5, 1, 4]]), experts, spw)
    layers = []
    for seed, tokens in ((1, 1), (2, 9), (3, 40)):
        w13_EHD, w2_EDF, [(x, ids, w)] = weights_and_inputs(seed, experts, 3, [tokens], D, F)
        layer = tiered_layer(placement, 0, LocalDispatcher(spw), w13_EHD, w2_EDF, budget, path)
        for _ in range(2):
            layer(x, ids, w)
        layers.append(layer)
    totals = tier_totals([layer.host for layer in layers])
    assert totals["host_rows"] + totals["fetched_rows"] == sum(int(layer.rows_S[budget:].sum()) for layer in layers)
    assert totals["steps"] == 6 and totals["host_rows"] + totals["fetched_rows"] > 0
    expert_bytes = (2 * F * D + D * F) * 4  # float32
    assert layers[0].host.expert_bytes == expert_bytes
    assert totals["copied_bytes"] == totals["fetched_experts"] * expert_bytes  # no prefetch here
    if path.mode == "host":
        assert totals["fetched_rows"] == totals["fetched_experts"] == totals["copied_bytes"] == 0
        assert totals["host_s"] > 0
    if path.mode == "fetch":
        assert totals["host_rows"] == totals["host_experts"] == 0 and totals["host_s"] == 0


def test_slot_views_and_writes_cross_the_tiers():
    w13_EHD, w2_EDF, _ = weights_and_inputs(1, 4, 1, [0], D, F)
    placement = Placement(np.array([[0, 1, 2, 3]]), 4, 4)
    layer = tiered_layer(placement, 0, LocalDispatcher(4), w13_EHD, w2_EDF, 1, PATHS[0])
    assert layer.num_slots == 4 and layer.rows_S.numel() == 4
    w13_SHD, w2_SDF = layer.all_slot_weights()
    torch.testing.assert_close(w13_SHD, w13_EHD)
    torch.testing.assert_close(w2_SDF, w2_EDF)
    layer.write_slot(0, w13_EHD[3], w2_EDF[3])  # a promotion lands in a device slot ...
    layer.write_slot(3, w13_EHD[0], w2_EDF[0])  # ... the demoted expert in a host slot
    torch.testing.assert_close(layer.slot_weights(0)[0], w13_EHD[3])
    torch.testing.assert_close(layer.host.w2_XDF[2], w2_EDF[0])


def test_auto_split_fetches_the_slots_with_many_rows():
    # by hand: all on the host 147.5 us; fetching the 30-row slot gives max(41, 52.5) us; also
    # fetching the 12-row one max(59, 13.3) us, longer: it stays
    fetch = split_cold(np.array([1, 0, 30, 2, 12]), RATES, device_s=5e-6)
    assert fetch.tolist() == [False, False, True, False, False]
    assert split_cold(np.array([30, 30]), RATES, device_s=0.0).tolist() == [True, True]  # 72 us < 95 us < 190 us
    assert not split_cold(np.array([1, 1]), RATES, device_s=1.0).any()  # a long device part: all on the host
    # a host bet must pay by the margin: 52.5 us against 74 us fetching all four touched slots
    rows = np.array([1, 0, 30, 2, 12])
    assert split_cold(rows, RATES, 5e-6, host_margin=0.25).tolist() == [False, False, True, False, False]
    assert split_cold(rows, RATES, 5e-6, host_margin=0.3).tolist() == [True, False, True, True, True]
    with pytest.raises(ValueError, match="host_margin.*1.5"):
        split_cold(np.array([1.0]), RATES, 0.0, host_margin=1.5)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"host_bias.*{bad}"):
            split_cold(np.array([1.0]), RATES, 0.0, host_bias=bad)
    with pytest.raises(ValueError, match="host_margin.*-0.1"):
        ColdPath("auto", RATES, host_margin=-0.1)
    # a host start cost over what the host saves: every touched slot is fetched
    started = dataclasses.replace(RATES, host_start_s=1e-4)
    assert split_cold(np.array([1, 0, 30, 2, 12]), started, device_s=5e-6).tolist() == [True, False, True, True, True]


def test_measured_rates_are_positive_and_finite():
    rates = measure_rates(D, F, torch.float32, torch.device("cpu"), reps=2)
    assert rates.expert_bytes == 3 * D * F * 4 and rates.row_bytes == D * 4
    assert all(np.isfinite(v) and v > 0 for v in (rates.host_row_s, rates.device_row_s, rates.pcie_bytes_per_s))


def test_cold_path_needs_rates_for_auto():
    with pytest.raises(ValueError, match="needs measured TierRates"):
        ColdPath("auto", None)
    with pytest.raises(ValueError, match="'host', 'fetch' or 'auto'"):
        ColdPath("disk", None)


# ---- expert parallelism: every worker has its own host tier ---------------------------------------
EP_CASE = (3, 7, 3, 4, [6, 1, 0])  # workers, experts, top-k, slots per worker, tokens per rank (an idle one)


def _ep_rank(group, rank, budget, mode):
    workers, experts, top_k, spw, tokens = EP_CASE
    w13_EHD, w2_EDF, inputs = weights_and_inputs(77, experts, top_k, tokens, D, F)
    placement = random_replicated_placement(1, experts, workers, spw, seed=5)
    path = ColdPath(mode, RATES if mode == "auto" else None, fetch_slots=2)
    layer = tiered_layer(placement, rank, AllToAllDispatcher(group, spw), w13_EHD, w2_EDF, budget, path)
    x, ids, w = inputs[rank]
    with torch.no_grad():
        return layer(x, ids, w).numpy(), dense_reference(x, ids, w, w13_EHD, w2_EDF).numpy()


@pytest.mark.parametrize("budget,mode", [(0, "host"), (1, "fetch"), (2, "auto"), (3, "host")])
def test_expert_parallel_host_tiers_equal_the_dense_reference(budget, mode):
    results = local_ranks.run_ranks(EP_CASE[0], _ep_rank, (budget, mode), timeout_s=20.0, wait_s=60.0,
                                    preload=("tests.unit.test_host_tier",))
    for got, want in results:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_measured_host_curve_rises_with_rows():
    rates = measure_rates(D, F, torch.float32, torch.device("cpu"), reps=1, curve_rows=(1, 8, 64))
    assert rates.host_curve_rows == (1.0, 8.0, 64.0)
    assert all(b >= a > 0 for a, b in zip(rates.host_curve_s, rates.host_curve_s[1:]))


def prefetch_stack_against_the_reference(device: torch.device, rates: TierRates, tol: float, hidden: int = D,
                                         ffn: int = F) -> list:
    """Three layers sharing one staging pool, cold path auto with fetches cheap: each layer
    prefetches the next one's hot host slots (the last layer the first's, for the next step).
    Step 4 writes slots between steps (a promotion and its demotion), which drops a pending
    prefetch; step 6 leaves a prefetched slot untouched (its staging position takes another
    fetch). Every layer step is checked against the dense reference; returns the layers' counts."""
    import dataclasses

    from moeray.tier_staging import StagingPool

    experts, budget, tokens, top_k = 8, 2, 12, 2
    fetchy = dataclasses.replace(rates, host_row_s=1e-3, host_expert_s=1e-3, host_curve_rows=(), host_curve_s=(),
                                 pcie_bytes_per_s=1e13, device_row_s=1e-9)
    path = ColdPath("auto", fetchy, fetch_slots=2, prefetch=True)
    pool = StagingPool(2, device)
    gen = torch.Generator().manual_seed(3)
    weights = [(torch.randn(experts, 2 * ffn, hidden, generator=gen) * hidden ** -0.5,
                torch.randn(experts, hidden, ffn, generator=gen) * ffn ** -0.5) for _ in range(3)]
    placement = Placement(np.tile(np.arange(experts), (1, 1)), experts, experts)
    layers = []
    for index, (w13_EHD, w2_EDF) in enumerate(weights):
        # own copies: the slot writes below must not reach the reference weights
        host = HostSlots(w13_EHD[budget:].clone(), w2_EDF[budget:].clone(), budget, device, path, pool, layer=index)
        layers.append(SlotExperts(w13_EHD[:budget].to(device), w2_EDF[:budget].to(device),
                                  DeviceSlotMap.from_placement(placement, 0, device), LocalDispatcher(experts), experts,
                                  kernel_impl="reference" if device.type == "cpu" else "auto", host=host))
    phy2log = np.arange(experts)
    for step in range(8):
        if step == 4:  # expert 5 (host slot 5) swaps with expert 0 (device slot 0) in every layer
            for layer, (w13_EHD, w2_EDF) in zip(layers, weights):
                layer.write_slot(0, w13_EHD[5].to(device), w2_EDF[5].to(device))
                layer.write_slot(5, w13_EHD[0], w2_EDF[0])
            phy2log[[0, 5]] = phy2log[[5, 0]]
            for layer in layers:
                layer.slot_map = DeviceSlotMap.from_placement(Placement(phy2log[None], experts, experts), 0, device)
        x = torch.randn(tokens, hidden, generator=gen)
        hot = [5 if t % 3 or step == 6 else 6 for t in range(tokens)]  # experts 5 and 6: hot, first on the host
        avoid = {6} if step == 6 else set()
        other = [[e for e in torch.randperm(experts, generator=gen).tolist() if e != h and e not in avoid][0] for h in hot]
        ids = torch.tensor([hot, other]).T.contiguous()
        w = torch.rand(tokens, top_k, generator=gen)
        for layer, (w13_EHD, w2_EDF) in zip(layers, weights):
            with torch.no_grad():
                got = layer(x.to(device), ids.to(device), w.to(device)).cpu()
            torch.testing.assert_close(got, dense_reference(x, ids, w, w13_EHD, w2_EDF), rtol=tol, atol=tol,
                                       msg=f"step {step}")
    return [layer.host.counts for layer in layers]


def test_prefetch_for_the_next_layer_equals_the_reference_through_a_slot_write():
    counts = prefetch_stack_against_the_reference(torch.device("cpu"), RATES, 1e-5)
    assert sum(c.prefetched for c in counts) >= 3 * 5  # from the second layer step on, the hot slots come prefetched
    assert sum(c.prefetch_unused for c in counts) >= 1  # step 6 leaves expert 6 untouched
    assert all(c.fetched_experts >= c.prefetched for c in counts)


def test_host_threads_leave_a_cpu_for_the_launch_thread(monkeypatch):
    from moeray.host_tier import host_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert host_threads(None, 1) == 16 and host_threads(None, 4) == 4 and host_threads(None, 32) == 1
    assert host_threads(None, 1, True) == 15 and host_threads(None, 4, True) == 3 and host_threads(None, 8, True) == 1
    assert host_threads(None, 16, True) == 1 and host_threads(None, 32, True) == 1  # never below one
    assert host_threads(16, 1, True) == 16  # configured: as given

"""The host tier on a GPU (issue 13): pinned host slots computed on the host beside the device
kernel, fetched into device staging slots on a side stream, or split per slot by measured rates;
equal to the dense reference at every budget; and the engine on one GPU with a host tier equal to
the single-process reference through a tier swap (NCCL-free: one worker).

Legend: T tokens, K top-k, E experts, D hidden, F expert FFN width.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from moeray.comm.dispatcher import LocalDispatcher
from moeray.comm.slot_map import DeviceSlotMap
from moeray.expert_parallel import SlotExperts
from moeray.host_tier import ColdPath, split_tiers
from moeray.tier_measure import measure_rates
from placement import Placement
from placement.tiering import swap_slots
from tests.helpers import engine_logits, make_checkpoint, reference_logits
from tests.unit.test_dispatch import dense_reference, weights_and_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

D, F = 64, 96


@pytest.fixture(scope="module")
def rates():
    return measure_rates(D, F, torch.float32, torch.device("cuda"), reps=3)


@pytest.mark.parametrize("mode,fetch_slots", [("host", 4), ("fetch", 1), ("fetch", 3), ("auto", 2)])
@pytest.mark.parametrize("tokens,top_k", [(1, 1), (1, 3), (9, 3), (300, 2)])
def test_every_budget_and_cold_path_equals_the_dense_reference(rates, mode, fetch_slots, tokens, top_k):
    experts, spw = 7, 8  # one free slot
    w13_EHD, w2_EDF, [(x, ids, w)] = weights_and_inputs(tokens + top_k, experts, top_k, [tokens], D, F)
    want = dense_reference(x, ids, w, w13_EHD, w2_EDF)
    placement = Placement(np.array([[3, 0, 6, -1, 2, 5, 1, 4]]), experts, spw)
    mine = placement.phy2log[0]
    held = torch.as_tensor(mine >= 0)[:, None, None]
    w13_SHD = torch.where(held, w13_EHD[np.maximum(mine, 0)], 0)
    w2_SDF = torch.where(held, w2_EDF[np.maximum(mine, 0)], 0)
    cuda = torch.device("cuda")
    path = ColdPath(mode, rates if mode == "auto" else None, fetch_slots)
    for budget in range(spw + 1):
        w13_BHD, w2_BDF, host = split_tiers(w13_SHD, w2_SDF, budget, cuda, path)
        assert host is None or host.w13_XHD.is_pinned()
        layer = SlotExperts(w13_BHD, w2_BDF, DeviceSlotMap.from_placement(placement, 0, cuda), LocalDispatcher(spw),
                            experts, host=host)
        with torch.no_grad():
            got = layer(x.to(cuda), ids.to(cuda), w.to(cuda)).cpu()
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3, msg=f"budget {budget}")
        assert int(layer.rows_S.sum()) == tokens * top_k


def test_measured_rates_are_plausible_for_a_gpu(rates):
    # a copy of this tiny expert (73 KB) is bound by its latency, not the link's tens of GB/s: an
    # H100 lease measured 0.47 GB/s (0.16 ms), so only the bound of a working pinned copy is checked
    assert 0 < rates.fetch_expert_s < 5e-3
    # per row at the most rows measured (compute-bound on both): the device is not slower than the host
    assert rates.device_row_s < rates.host_curve_s[-1] / rates.host_curve_rows[-1]
    assert list(rates.host_curve_s) == sorted(rates.host_curve_s)


def test_the_engine_with_a_host_tier_equals_the_reference_through_a_swap(ray_cluster, tmp_path):
    from moeray.llm import LLM

    model_shape = dict(hidden_size=256, moe_intermediate_size=512, num_experts=16, top_k=4, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    ckpt, cfg, model = make_checkpoint(tmp_path, family="mixtral", dtype="float32", **model_shape)
    model = model.to("cuda")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, n) for n in (200, 1, 33)]
    tier = {"device_slots": 6, "cold_path": "auto", "tiering": "static"}
    with LLM(ckpt, num_workers=1, device="cuda", dtype="float32", tier=tier, stats={"snapshot_interval_steps": 1},
             rebalance={"enabled": False}) as llm:
        engine = llm.engine
        for got, ids in zip(engine_logits(engine, prompts), prompts):
            np.testing.assert_allclose(got, reference_logits(model, ids), rtol=0, atol=1e-2 * float(np.abs(got).max()))
        p = engine.placement()
        version = engine.rebalance(placement=swap_slots(p, [(layer, 0, 10) for layer in range(p.num_layers)]))
        import ray

        # staged where each lands: the promoted expert (into device slot 0) on the device, the
        # demoted one (into host slot 10) in pinned host memory, not in device room
        where = ray.get(engine.workers[0].__ray_call__.remote(lambda self: {
            key: (w13.device.type, w13.is_pinned()) for key, (w13, _) in self.staging._staged.slots.items()}))
        assert where == {**{(layer, 0): ("cuda", False) for layer in range(p.num_layers)},
                         **{(layer, 10): ("cpu", True) for layer in range(p.num_layers)}}, where
        for got, ids in zip(engine_logits(engine, prompts), prompts):  # the first step commits the swap
            np.testing.assert_allclose(got, reference_logits(model, ids), rtol=0, atol=1e-2 * float(np.abs(got).max()))
        assert engine.placement().version == version
        report = ray.get(engine.workers[0].memory_report.remote())
        assert report["host_slot_bytes"] == cfg.num_moe_layers * 10 * cfg.expert_bytes


def test_prefetch_for_the_next_layer_equals_the_reference_on_a_gpu(rates):
    from tests.unit.test_host_tier import prefetch_stack_against_the_reference

    counts = prefetch_stack_against_the_reference(torch.device("cuda"), rates, 2e-3, hidden=D, ffn=F)
    assert sum(c.prefetched for c in counts) >= 3 * 5 and sum(c.prefetch_unused for c in counts) >= 1


@pytest.mark.parametrize("launch_thread", [False, True], ids=["inline", "launch_thread"])
def test_fetch_rounds_beside_the_host_math_equal_the_reference_on_a_gpu(launch_thread):
    """The launches queued inline (the default) or on the launch thread (tier.launch_thread)."""
    from tests.unit.test_host_tier import fetch_rounds_beside_host_math_against_the_reference

    for counts in fetch_rounds_beside_host_math_against_the_reference(torch.device("cuda"), 2e-3, hidden=D, ffn=F,
                                                                      launch_thread=launch_thread):
        assert counts.fetched_experts >= 2 * 3 and counts.host_experts >= 2 * 2, counts


def _compiled(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps no device_caches to count compiled kernels in")
    return sum(len(cache[0]) for cache in caches.values())


def test_compiled_tiles_cover_the_resident_kernel_at_any_rows_per_slot():
    """compile_tiles at B device slots (split_tiers calls it): whatever rows per slot the live
    tiering brings to the device slots, no tile is compiled mid-run (about a second each)."""
    from moeray.kernels import triton_swiglu

    B = 16
    gen = torch.Generator().manual_seed(3)
    w13_BHD = (torch.randn(B, 2 * F, D, generator=gen) * 0.05).to(torch.bfloat16).cuda()
    w2_BDF = (torch.randn(B, D, F, generator=gen) * 0.05).to(torch.bfloat16).cuda()
    triton_swiglu.compile_tiles(w13_BHD, w2_BDF)
    kernels = (triton_swiglu._gate_up_kernel, triton_swiglu._down_kernel)
    before = [_compiled(k) for k in kernels]
    for rows_per_slot in (1, 4, 12, 40, 90, 200, 600):
        N = rows_per_slot * B
        x_XD = (torch.randn(N, D, generator=gen) * 0.1).to(torch.bfloat16).cuda()
        offsets_B1 = torch.arange(0, N + 1, rows_per_slot, device="cuda")
        triton_swiglu.expert_mlp_triton(x_XD, w13_BHD, w2_BDF, offsets_B1, torch.arange(N, device="cuda"))
    torch.cuda.synchronize()
    assert [_compiled(k) for k in kernels] == before


@pytest.mark.parametrize("launch_thread", [False, True], ids=["inline", "launch_thread"])
def test_host_results_join_the_main_stream_however_late_their_copy(monkeypatch, launch_thread):
    """The host rows' results come back on the rows stream; held there ~0.1 s (a sleep queued
    before their copy), the combine on the main stream must still wait for them."""
    from moeray.host_tier import HostSlots

    original = HostSlots._host_math

    def then_a_busy_rows_stream(self, *args, **kwargs):
        at = original(self, *args, **kwargs)
        with torch.cuda.stream(self._cuda_streams()[0]):
            torch.cuda._sleep(200_000_000)  # cycles: ~0.1 s at 2 GHz, before the results' copy
        return at

    monkeypatch.setattr(HostSlots, "_host_math", then_a_busy_rows_stream)
    with six_expert_layer(11, ColdPath("host", None), launch_thread) as (step, host):
        step()
        assert host.counts.host_experts == 4


@contextlib.contextmanager
def six_expert_layer(seed: int, path: ColdPath, launch_thread: bool):
    """(step: one layer step checked against the dense reference, the layer's host slots): six
    experts over 40 tokens, top-2, two device slots, a staging pool of two (with or without the
    launch thread, closed on exit)."""
    from moeray.tier_staging import StagingPool

    experts, top_k, tokens = 6, 2, 40
    w13_EHD, w2_EDF, [(x, ids, w)] = weights_and_inputs(seed, experts, top_k, [tokens], D, F)
    want = dense_reference(x, ids, w, w13_EHD, w2_EDF)
    placement = Placement(np.arange(experts)[None], experts, experts)
    cuda = torch.device("cuda")
    pool = StagingPool(2, cuda, launch_thread=launch_thread)
    try:
        w13_BHD, w2_BDF, host = split_tiers(w13_EHD, w2_EDF, 2, cuda, path, pool)
        layer = SlotExperts(w13_BHD, w2_BDF, DeviceSlotMap.from_placement(placement, 0, cuda), LocalDispatcher(experts),
                            experts, host=host)

        def step() -> None:
            with torch.no_grad():
                got = layer(x.to(cuda), ids.to(cuda), w.to(cuda)).cpu()
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)

        yield step, host
    finally:
        pool.close()


def test_layer_span_times_the_current_stream_and_reads_a_step_at_the_next_one():
    """The events go on the layer device's current stream (a side stream here: the ~50 ms sleep
    queued there between begin and end shows in the reading) and a step is read at the next one's
    end, its tag with it."""
    from moeray.tier_calibration import LayerSpan

    span = LayerSpan(torch.device("cuda"))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        span.begin()
        torch.cuda._sleep(100_000_000)  # cycles: ~50 ms at 2 GHz
        assert span.end("first") is None  # nothing read before
        side.synchronize()  # what the next layer step's host sync does
        span.begin()
        seconds, tag = span.end("second")
    assert tag == "first" and 0.01 < seconds < 5
    side.synchronize()
    assert span.collect()[1] == "second" and span.collect() is None


@pytest.mark.parametrize("launch_thread", [False, True], ids=["inline", "launch_thread"])
def test_layer_steps_teach_the_split_one_step_late_and_a_new_path_forgets_them(rates, launch_thread):
    """Auto splits with copies made slow (1 MB/s), so every step leaves slots on the host and, with
    the launch thread, queues its launches there beside the host math."""
    slow_copies = dataclasses.replace(rates, pcie_bytes_per_s=1e6)
    with six_expert_layer(13, ColdPath("auto", slow_copies, split_trial=False), launch_thread) as (step, host):

        def observed_after_a_step() -> int:
            step()
            return host._calibration.split_steps + host._calibration.fetch_steps

        assert [observed_after_a_step() for _ in range(3)] == [0, 1, 2]  # each step read at the next one's end
        assert host.counts.host_experts >= 3 * 2 and host.counts.fetched_experts == 0
        assert (host.pool._launcher is not None) == launch_thread  # the launch thread was used
        host.path = ColdPath("auto", slow_copies, split_trial=False)
        assert observed_after_a_step() == 0  # the step timed under the old path is not read


@pytest.mark.parametrize("slow", ["host", "fetch"])
def test_the_split_trial_keeps_to_the_arm_whose_gpu_steps_ran_shorter(rates, slow):
    """Copies modelled slow (1 MB/s), so the model proposes leaving every touched slot on the host;
    then either the host math is made slow (a 20 ms sleep on this thread) or the fetch rounds (a
    ~10 ms device sleep a fetched slot, queued on the main stream, which the layer's timing events
    see). Read one step late from the CUDA events, the trial learns to fetch everything or to keep
    the split; every step equals the reference either way."""
    import time

    from moeray.host_tier import HostSlots
    from moeray.tier_calibration import SplitTrial
    from placement.split_trial import TrialConfig

    original_host, original_rounds = HostSlots._host_math, HostSlots._fetch_rounds

    def slow_host(self, *args):
        time.sleep(0.02)
        return original_host(self, *args)

    def slow_rounds(self, rows_X, slots, pending):
        torch.cuda._sleep(int(2e7 * len(slots)))  # cycles: ~10 ms a slot at 2 GHz
        return original_rounds(self, rows_X, slots, pending)

    slow_copies = dataclasses.replace(rates, pcie_bytes_per_s=1e6)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HostSlots, "_host_math" if slow == "host" else "_fetch_rounds",
                      slow_host if slow == "host" else slow_rounds)
        with six_expert_layer(17, ColdPath("auto", slow_copies, learn_split=False, split_trial=True), False) as (step, host):
            host.trial = SplitTrial(TrialConfig(window=7, min_observed=4, warmup=1, explore_every=8), seed=3)
            for _ in range(30):
                step()
            (_, view), = host.trial.view().items()  # one rows bucket: every step routes the same 80 rows
            assert not view["learning"] and view["prefer_split"] == (slow == "fetch"), view
            assert host.counts.proposed == 30 and (host.counts.overruled > 15) == (slow == "host"), host.counts

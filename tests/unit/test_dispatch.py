"""Dispatchers and the device slot map against the obviously correct paths.

AllToAllDispatcher runs over real Gloo groups, one process per rank (moeray.comm.local_ranks, no
Ray): the same exchange code the workers run, on awkward sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeray.comm import local_ranks
from moeray.comm.dispatcher import AllToAllDispatcher, LocalDispatcher
from moeray.comm.slot_map import DeviceSlotMap, pairs_to_slots
from moeray.expert_parallel import SlotExperts
from moeray.kernels import expert_mlp
from moeray.models.layers import DenseExperts
from placement import dispatch as ref_dispatch

from tests.helpers import random_replicated_placement


def run_ranks(world_size: int, fn, args=()):
    """fn(group, rank, *args) on `world_size` Gloo ranks in separate processes."""
    return local_ranks.run_ranks(world_size, fn, args, timeout_s=20.0, wait_s=60.0, preload=("tests.unit.test_dispatch",))


def dense_reference(x_TD, ids_TK, w_TK, w13_EHD, w2_EDF):
    experts = DenseExperts(w13_EHD.shape[0], w13_EHD.shape[2], w2_EDF.shape[2])
    experts.w13_EHD.data.copy_(w13_EHD)
    experts.w2_EDF.data.copy_(w2_EDF)
    return experts(x_TD, ids_TK, w_TK)


def ep_forward(dispatcher, x_TD, ids_TK, w_TK, slot_map, w13_SHD, w2_SDF):
    dispatched = dispatcher.dispatch(x_TD, pairs_to_slots(ids_TK, slot_map))
    y_MD = expert_mlp(dispatched.tokens_MD, w13_SHD, w2_SDF, dispatched.slot_offsets_S1, dispatched.order_M,
                      impl="reference")
    unfused_TD = (dispatcher.combine(y_MD, dispatched) * w_TK.unsqueeze(-1)).sum(1)
    fused_TD = dispatcher.combine_weighted(y_MD, dispatched, w_TK)  # the serving path; a second exchange
    torch.testing.assert_close(fused_TD, unfused_TD, rtol=1e-6, atol=1e-6)
    return fused_TD


OVERLAP_CHUNKS = (2, 5)
CASES = [  # (workers, experts, top_k, slots_per_worker, tokens per rank)
    (1, 5, 2, 5, [7]),
    (2, 4, 1, 2, [3, 0]),            # an idle rank
    (3, 7, 2, 3, [1, 5, 2]),         # experts not divisible by workers, a one-token rank
    (4, 8, 8, 3, [4, 1, 0, 6]),      # top-k = E, replicas, an idle rank
    (3, 5, 3, 4, [0, 0, 0]),         # nobody has tokens
]


def weights_and_inputs(seed, experts, top_k, tokens, D, F):
    """Deterministic expert weights and per-rank (x, ids, weights) inputs of `tokens[rank]` tokens
    (top_k distinct experts each), rebuilt identically in every rank."""
    gen = torch.Generator().manual_seed(seed)
    w13_EHD = torch.randn(experts, 2 * F, D, generator=gen)
    w2_EDF = torch.randn(experts, D, F, generator=gen)
    inputs = []
    for t in tokens:
        x = torch.randn(t, D, generator=gen)
        ids = (torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(t)]) if t
               else torch.zeros(0, top_k, dtype=torch.long))
        inputs.append((x, ids, torch.rand(t, top_k, generator=gen)))
    return w13_EHD, w2_EDF, inputs


def make_case(workers, experts, top_k, spw, tokens):
    """Deterministic weights, placement and per-rank inputs (rebuilt identically in every rank)."""
    w13_EHD, w2_EDF, inputs = weights_and_inputs(workers * 100 + experts, experts, top_k, tokens, D=12, F=20)
    placement = random_replicated_placement(1, experts, workers, spw, seed=workers)
    return w13_EHD, w2_EDF, placement, inputs


def _case_rank(group, rank, case):
    workers, experts, top_k, spw, tokens = case
    w13_EHD, w2_EDF, placement, inputs = make_case(*case)
    slot_map = DeviceSlotMap.from_numpy(placement.log2phy[0], placement.num_slots)
    mine = placement.slots_of_worker(rank)[0]
    held = torch.as_tensor(mine >= 0)[:, None, None]
    w13 = torch.where(held, w13_EHD[np.maximum(mine, 0)], 0)
    w2 = torch.where(held, w2_EDF[np.maximum(mine, 0)], 0)
    dispatcher = AllToAllDispatcher(group, spw) if workers > 1 else LocalDispatcher(spw)
    outs, rows = {"plain": ep_forward(dispatcher, *inputs[rank], slot_map, w13, w2).numpy()}, {}
    for chunks in OVERLAP_CHUNKS:  # the pipelined layer step; more chunks than some ranks' tokens
        layer = SlotExperts(w13, w2, slot_map, dispatcher, experts, kernel_impl="reference", overlap_chunks=chunks)
        outs[f"chunks{chunks}"] = layer(*inputs[rank]).numpy()
        assert int(layer.load_E.sum()) == inputs[rank][1].numel()  # pairs this rank routed
        rows[chunks] = int(layer.rows_S.sum())  # rows this rank computed
    return outs, rows


@pytest.mark.parametrize("case", CASES, ids=[f"W{c[0]}-E{c[1]}-k{c[2]}" for c in CASES])
def test_all_to_all_dispatch_matches_dense_reference(case):
    w13_EHD, w2_EDF, _, inputs = make_case(*case)
    results = run_ranks(case[0], _case_rank, (case,))
    for chunks in OVERLAP_CHUNKS:  # every routed pair was computed exactly once, somewhere
        assert sum(rows[chunks] for _, rows in results) == sum(ids.numel() for _, ids, _ in inputs)
    for rank, (x, ids, w) in enumerate(inputs):
        want = dense_reference(x, ids, w, w13_EHD, w2_EDF)
        for name, got in results[rank][0].items():
            assert got.shape == tuple(want.shape), name
            # 1e-4: the reference runs in this process, whose torch thread count an earlier test may
            # have set (Worker sets 1); another summation order moves fp32 results by ~2e-5.
            torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-4, atol=1e-4, msg=name)


def test_local_dispatcher_round_trip_preserves_pair_order():
    slot_ids = torch.tensor([[2, 0], [1, 2], [0, 1]])
    x = torch.arange(3, dtype=torch.float32)[:, None].repeat(1, 4)
    d = LocalDispatcher(3)
    dispatched = d.dispatch(x, slot_ids)
    assert dispatched.slot_offsets_S1.tolist() == [0, 2, 4, 6]
    back = d.combine(dispatched.tokens_MD, dispatched)
    assert torch.equal(back[:, :, 0], torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))


@pytest.mark.parametrize("seed", range(5))
def test_device_slot_map_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    placement = random_replicated_placement(1, 6, 4, 3, seed=seed)
    log2phy_ER = placement.log2phy[0]
    weights_ER = np.where(log2phy_ER >= 0, rng.random(log2phy_ER.shape) + 0.05, 0.0)
    weights_ER /= weights_ER.sum(1, keepdims=True)
    ids_TK = np.stack([rng.permutation(6)[:2] for _ in range(int(rng.integers(1, 60)))])
    want = ref_dispatch.split_to_slots(ids_TK, log2phy_ER, weights_ER)
    slot_map = DeviceSlotMap.from_numpy(log2phy_ER, placement.num_slots, weights_ER)
    got = pairs_to_slots(torch.as_tensor(ids_TK), slot_map).numpy()
    np.testing.assert_array_equal(got, want)


def test_equal_weights_split_a_hot_expert_evenly():
    log2phy_ER = np.array([[0, 1, 2], [3, -1, -1]])
    slot_map = DeviceSlotMap.from_numpy(log2phy_ER, 4)
    slots = pairs_to_slots(torch.zeros(9, 1, dtype=torch.long), slot_map)
    assert np.bincount(slots.numpy().ravel(), minlength=4).tolist() == [3, 3, 3, 0]

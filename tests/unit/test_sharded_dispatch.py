"""Sharded slots through the real layer path (slot map fan-out, dispatchers, kernel widths,
weighted combine) and the per-batch split on device, against the dense reference.

AllToAllDispatcher runs over real Gloo groups, one process per rank (moeray.comm.local_ranks).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeray.comm import local_ranks
from moeray.comm.batch_split import DeviceReplicaUnits
from moeray.comm.dispatcher import AllToAllDispatcher, LocalDispatcher
from moeray.comm.slot_map import DeviceSlotMap, fan_out_weights, pairs_to_slots
from moeray.expert_parallel import SlotExperts
from moeray.shard_slots import assemble_slot, columns_of_worker, pack_columns, put_columns, take_columns, width_of_worker
from placement.batch_split import ReplicaUnits

from tests.helpers import random_replicated_placement, random_sharded_placement
from tests.unit.test_dispatch import dense_reference, weights_and_inputs

D, F = 12, 21  # F odd: shard boundaries round


def run_ranks(world_size: int, fn, args=()):
    return local_ranks.run_ranks(world_size, fn, args, timeout_s=20.0, wait_s=60.0,
                                 preload=("tests.unit.test_sharded_dispatch",))


CASES = [  # (workers, experts, top_k, slots_per_worker, tokens per rank, weighted)
    (2, 3, 2, 3, [5, 0], False),           # an idle rank, every expert on both workers
    (3, 5, 3, 4, [1, 7, 2], True),         # a one-token rank, odd top-k, shards of 3
    (4, 6, 1, 3, [4, 1, 0, 9], True),      # top-1, an idle rank, experts not divisible by workers
    (3, 4, 4, 3, [0, 0, 0], False),        # nobody has tokens
]


def make_case(workers, experts, top_k, spw, tokens, weighted):
    w13_EHD, w2_EDF, inputs = weights_and_inputs(workers * 100 + experts, experts, top_k, tokens, D, F)
    placement = random_sharded_placement(1, experts, workers, spw, seed=workers + experts, weighted=weighted)
    return w13_EHD, w2_EDF, placement, inputs


def worker_slots(placement, rank, w13_EHD, w2_EDF):
    mine = placement.slots_of_worker(rank)[0]
    held = torch.as_tensor(mine >= 0)[:, None, None]
    w13 = torch.where(held, w13_EHD[np.maximum(mine, 0)], 0)
    w2 = torch.where(held, w2_EDF[np.maximum(mine, 0)], 0)
    return pack_columns(w13, w2, columns_of_worker(placement, 0, rank, F))


def layer_of(placement, rank, dispatcher, w13_EHD, w2_EDF, split: bool, chunks: int = 1):
    w13, w2 = worker_slots(placement, rank, w13_EHD, w2_EDF)
    units = DeviceReplicaUnits.from_units(ReplicaUnits.of(placement), 0, placement.replica_weights) if split else None
    return SlotExperts(w13, w2, DeviceSlotMap.from_placement(placement, 0), dispatcher, placement.num_experts,
                       kernel_impl="reference", overlap_chunks=chunks, width_S=width_of_worker(placement, 0, rank, F, "cpu"),
                       batch_split=units)


def _case_rank(group, rank, case):
    w13_EHD, w2_EDF, placement, inputs = make_case(*case)
    spw = placement.slots_per_worker
    dispatcher = AllToAllDispatcher(group, spw) if case[0] > 1 else LocalDispatcher(spw)
    outs, rows = {}, {}
    for split in (False, True):
        for chunks in (1, 3):
            layer = layer_of(placement, rank, dispatcher, w13_EHD, w2_EDF, split, chunks)
            name = f"split={split} chunks={chunks}"
            outs[name] = layer(*inputs[rank]).numpy()
            rows[name] = layer.rows_S.numpy()
    return outs, rows


@pytest.mark.parametrize("case", CASES, ids=[f"W{c[0]}-E{c[1]}-k{c[2]}" for c in CASES])
def test_sharded_layer_matches_dense_reference(case):
    w13_EHD, w2_EDF, placement, inputs = make_case(*case)
    assert placement.is_sharded  # the case exercises shards (and whole slots / replicas beside them)
    results = run_ranks(case[0], _case_rank, (case,))
    for rank, (x, ids, w) in enumerate(inputs):
        want = dense_reference(x, ids, w, w13_EHD, w2_EDF)
        for name, got in results[rank][0].items():
            torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-4, atol=1e-4, msg=name)
    # every routed pair was computed once on every shard of its replica: rows = sum over the pairs
    # of their replica's shard count, whichever replica the split chose
    for name in results[0][1]:
        rows_S = np.concatenate([results[rank][1][name] for rank in range(case[0])])
        shards_of_slot = {}
        for slot in np.flatnonzero(placement.phy2log[0] >= 0):
            expert, replica = int(placement.phy2log[0, slot]), int(placement.replica_of_slot[0, slot])
            shards_of_slot.setdefault((expert, replica), []).append(slot)
        total_pairs = sum(ids.numel() for _, ids, _ in inputs)
        pairs_counted = sum(rows_S[slots].sum() / len(slots) for slots in shards_of_slot.values())
        assert pairs_counted == pytest.approx(total_pairs), name
        for slots in shards_of_slot.values():  # the shards of one replica see the same rows
            assert len(set(rows_S[slots].tolist())) == 1, name


def test_one_worker_whole_slots_are_unchanged_by_the_fan_out():
    """One worker (no shards possible): the slot map has J = 1 and the split runs locally."""
    case = (1, 5, 2, 7, [6], False)
    w13_EHD, w2_EDF, _, inputs = make_case(*case)
    placement = random_replicated_placement(1, 5, 1, 7, seed=3)
    assert DeviceSlotMap.from_placement(placement, 0).max_shards == 1
    x, ids, w = inputs[0]
    want = dense_reference(x, ids, w, w13_EHD, w2_EDF)
    for split in (False, True):
        got = layer_of(placement, 0, LocalDispatcher(7), w13_EHD, w2_EDF, split)(x, ids, w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fan_out_pads_narrow_replicas_and_zeroes_their_weight():
    # expert 0: one replica of 3 shards (slots 0, 2, 4); expert 1: two whole replicas (1, 3); 5 free
    from placement import Placement

    phy2log = np.array([[0, 1, 0, 1, 0, -1]])
    width = np.array([[0.25, 1, 0.5, 1, 0.25, 0]])
    placement = Placement(phy2log, 2, 2, shard_width=width).validate()
    slot_map = DeviceSlotMap.from_placement(placement, 0)
    assert (slot_map.max_replicas, slot_map.max_shards) == (2, 3)
    ids = torch.tensor([[0, 1], [1, 0]])
    slots = pairs_to_slots(ids, slot_map)
    assert slots.tolist() == [[0, 2, 4, 1, 6, 6], [3, 6, 6, 0, 2, 4]]  # 6 = num_slots: padding
    weights = fan_out_weights(torch.tensor([[0.7, 0.3], [0.6, 0.4]]), slots, slot_map)
    assert torch.allclose(weights, torch.tensor([[0.7, 0.7, 0.7, 0.3, 0, 0], [0.6, 0, 0, 0.4, 0.4, 0.4]]))


def test_columns_round_trip_through_take_and_put():
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(1, 2 * F, D, generator=gen), torch.randn(1, D, F, generator=gen)
    packed13, packed2 = pack_columns(w13, w2, [[5, 17]])
    assert packed13[0, 12:F].abs().sum() == 0 and packed2[0, :, 12:].abs().sum() == 0  # zeros after the width
    assert torch.equal(packed13[0, :12], w13[0, 5:17]) and torch.equal(packed13[0, F:F + 12], w13[0, F + 5:F + 17])
    piece = take_columns(packed13[0], packed2[0], (5, 17), (9, 13))
    target13, target2 = torch.zeros(2 * F, D), torch.zeros(D, F)
    put_columns(target13, target2, (9, 21), (9, 13), *piece)
    assert torch.equal(target13[:4], w13[0, 9:13]) and torch.equal(target2[:, :4], w2[0, :, 9:13])
    with pytest.raises(ValueError, match=r"\[3, 13\)"):
        take_columns(packed13[0], packed2[0], (5, 17), (3, 13))


def test_assemble_slot_from_kept_columns_and_pieces():
    gen = torch.Generator().manual_seed(1)
    w13, w2 = torch.randn(1, 2 * F, D, generator=gen), torch.randn(1, D, F, generator=gen)
    live13, live2 = pack_columns(w13, w2, [[0, 8]])        # this slot held [0, 8)
    other13, other2 = pack_columns(w13, w2, [[8, F]])      # another worker's shard [8, 21)
    # the slot now holds [4, 15): [4, 8) kept, [8, 15) from the other shard
    got13, got2 = assemble_slot((4, 15), (2 * F, D), (D, F), torch.float32, "cpu", kept=(live13[0], live2[0], (0, 8)),
                                pieces=[(other13[0], other2[0], (8, F), (8, 15))])
    want13, want2 = pack_columns(w13, w2, [[4, 15]])
    assert torch.equal(got13, want13[0]) and torch.equal(got2, want2[0])
    with pytest.raises(ValueError, match="column 8 .* 0 sources"):
        assemble_slot((4, 15), (2 * F, D), (D, F), torch.float32, "cpu", kept=(live13[0], live2[0], (0, 8)))
    with pytest.raises(ValueError, match="column 4 .* 2 sources"):
        assemble_slot((4, 15), (2 * F, D), (D, F), torch.float32, "cpu", kept=(live13[0], live2[0], (0, 8)),
                      pieces=[(w13[0], w2[0], (0, F), (4, 15))])


def test_realised_compute_weights_a_shards_rows_by_its_width():
    """The coordinator's realised imbalance counts a shard's rows at its width (rows x w / F)."""
    from moeray.coordinator_core import CoordinatorCore
    from moeray.stats_wire import LoadSnapshot
    from placement import Placement, Topology
    from placement.policy import PolicyConfig

    # one layer, 2 workers x 2 slots: expert 0 sharded 0.25 / 0.75 over both workers, 1 and 2 whole
    placement = Placement(np.array([[0, 1, 0, 2]]), 3, 2, shard_width=np.array([[0.25, 1, 0.75, 1]])).validate()
    core = CoordinatorCore(placement=placement, topology=Topology.flat(2, 2), bytes_per_expert=100, window_steps=8,
                           policy_config=PolicyConfig())
    rows = {0: np.array([[8, 4]]), 1: np.array([[8, 4]])}  # expert 0's 8 rows reach both shards
    for worker in (0, 1):
        core.ingest(LoadSnapshot(worker=worker, epoch=0, version=0, step_lo=0, step_hi=1,
                                 counts_LE=np.array([[8, 4, 4]]) if worker == 0 else np.zeros((1, 3), dtype=np.int64),
                                 rows_LS=rows[worker]))
    _, _, _, rows_LW = core.history[-1]
    assert np.allclose(rows_LW, [[8 * 0.25 + 4, 8 * 0.75 + 4]])


@pytest.mark.parametrize("seed", range(40))
def test_migrations_between_non_dyadic_widths_assemble_exactly(seed):
    """Widths in tenths on an odd F (fractions that are not exact floats, rint ties): the worker's
    integer-column assembly of every changed slot equals packing the checkpoint's columns."""
    from placement import Placement, migration_between
    from moeray.slot_loading import assemble_next_slots

    rng = np.random.default_rng(seed)
    ffn, experts, workers, spw = int(rng.choice([5, 7, 15, 21])), 2, 4, 2

    def sharded_placement():
        phy2log = np.full((1, workers * spw), -1)
        width = np.zeros((1, workers * spw))
        for expert in range(experts):
            k = int(rng.integers(1, workers + 1))
            cuts = np.sort(rng.choice(np.arange(1, 10), size=k - 1, replace=False)) / 10
            slots = [w * spw + expert for w in rng.permutation(workers)[:k]]
            slots.sort()
            phy2log[0, slots], width[0, slots] = expert, np.diff(np.r_[0, cuts, 1])
        return Placement(phy2log, experts, spw, shard_width=width).validate()

    old, new = sharded_placement(), sharded_placement()
    gen = torch.Generator().manual_seed(seed)
    whole13, whole2 = torch.randn(experts, 2 * ffn, 3, generator=gen), torch.randn(experts, 3, ffn, generator=gen)

    def slots_of(placement, rank):
        experts_S = placement.slots_of_worker(rank)[0]
        w13 = torch.where(torch.as_tensor(experts_S >= 0)[:, None, None], whole13[np.maximum(experts_S, 0)], 0)
        w2 = torch.where(torch.as_tensor(experts_S >= 0)[:, None, None], whole2[np.maximum(experts_S, 0)], 0)
        return pack_columns(w13, w2, columns_of_worker(placement, 0, rank, ffn))

    live = {rank: slots_of(old, rank) for rank in range(workers)}
    migration = migration_between(old, new)
    for rank in range(workers):
        shipped = {}
        for layer, dst, src, _, _ in migration.column_copies():
            if dst // spw == rank:
                src13, src2 = live[src // spw]
                shipped.setdefault((layer, dst % spw), []).append((src13[src % spw], src2[src % spw], src))
        got = assemble_next_slots(old, new, rank, lambda layer: live[rank], shipped, torch.float32, "cpu")
        want13, want2 = slots_of(new, rank)
        for (_, slot), (w13, w2) in got.items():
            assert torch.equal(w13, want13[slot]) and torch.equal(w2, want2[slot]), (rank, slot)

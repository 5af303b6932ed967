"""moeray.comm.batch_split (torch, one layer) against the numpy reference placement.batch_split."""

import numpy as np
import pytest
import torch

from moeray.comm.batch_split import (
    DeviceReplicaUnits,
    _numpy_order_sum,
    global_rank_offsets,
    replica_of_pairs,
    split_rows,
)
from placement.batch_split import ReplicaUnits, pairs_to_slots, split_batch
from placement.layout import Placement

PATTERNS = {"whole": [(1.0,)], "sharded": [(0.5, 0.5), (0.3, 0.7), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.75)]}
PATTERNS["mixed"] = PATTERNS["whole"] * 4 + PATTERNS["sharded"]


def random_layout(rng, kind, workers, spw, experts, layers=1, idle=0, max_replicas=5):
    """A valid Placement: every expert held, replicas of `kind` shard patterns on distinct workers
    (an expert's slots in ascending order take its patterns' widths in sequence); the last `idle`
    workers hold nothing; planned weights random (equal on the shards of a replica) or None."""
    phy2log = np.full((layers, workers * spw), -1)
    width = np.zeros((layers, workers * spw))
    for layer in range(layers):
        free = {w: list(rng.permutation(np.arange(w * spw, (w + 1) * spw))) for w in range(workers - idle)}
        slots, patterns = {e: [] for e in range(experts)}, {e: [] for e in range(experts)}

        def add(e, pattern):
            open_workers = [w for w, left in free.items() if left and not any(s // spw == w for s in slots[e])]
            if len(open_workers) < len(pattern):
                return False
            slots[e] += [free[w].pop() for w in rng.choice(open_workers, size=len(pattern), replace=False)]
            patterns[e].append(pattern)
            return True

        choices = PATTERNS[kind]
        for placed, e in enumerate(rng.permutation(experts)):  # every expert once (whole when short of slots)
            pattern = choices[rng.integers(len(choices))]
            room = sum(map(len, free.values())) - len(pattern) >= experts - placed - 1
            (room and add(e, pattern)) or add(e, (1.0,))
        for e in rng.permutation(experts):  # then extra replicas where they fit
            for _ in range(rng.integers(0, max_replicas)):
                add(e, choices[rng.integers(len(choices))])
        for e in range(experts):
            order = sorted(slots[e])
            phy2log[layer, order] = e
            width[layer, order] = [x for p in patterns[e] for x in p]
    placement = Placement(phy2log, experts, spw, shard_width=width).validate()
    if rng.random() < 0.5:
        return placement, None
    # planned weights per replica, shared by its shards, normalised per expert
    replica, held = placement.replica_of_slot, phy2log >= 0
    raw = rng.random((layers, experts, 3 * max_replicas)) + 0.05
    raw *= np.arange(3 * max_replicas) < placement.num_replicas[..., None]
    rows = np.arange(layers)[:, None]
    expert = np.maximum(phy2log, 0)
    weights = np.where(held, raw[rows, expert, np.maximum(replica, 0)] / raw.sum(axis=2)[rows, expert], 0.0)
    return Placement(phy2log, experts, spw, replica_weights=weights, shard_width=width).validate(), weights


def numpy_rows_ER(placement, rows_S, layer, num_replicas):
    rows_ER = np.zeros((placement.num_experts, num_replicas), dtype=np.int64)
    held = placement.phy2log[layer] >= 0
    rows_ER[placement.phy2log[layer, held], placement.replica_of_slot[layer, held]] = rows_S[held]
    return rows_ER


def device_rows(units, layer, weights, counts_E, **options):
    device_units = DeviceReplicaUnits.from_units(units, layer, weights)
    return device_units, split_rows(device_units, torch.as_tensor(counts_E), **options).numpy()


def check_against_numpy(placement, weights, counts_LE, **options):
    units = ReplicaUnits.of(placement)
    reference = split_batch(units, counts_LE[None], weights, **options)[0]
    for layer in range(placement.num_layers):
        device_units, rows_ER = device_rows(units, layer, weights, counts_LE[layer], **options)
        assert rows_ER.dtype == np.int64 and (rows_ER >= 0).all()
        assert np.array_equal(rows_ER.sum(axis=1), counts_LE[layer])
        expected = numpy_rows_ER(placement, reference[layer], layer, rows_ER.shape[1])
        assert np.array_equal(rows_ER, expected), (layer, rows_ER, expected)
    return units, reference


@pytest.mark.parametrize("kind", ["whole", "sharded", "mixed"])
def test_rows_equal_the_numpy_reference_on_random_placements(kind):
    rng = np.random.default_rng({"whole": 11, "sharded": 12, "mixed": 13}[kind])
    for case in range(120):
        workers, spw = int(rng.integers(2, 9)), int(rng.integers(1, 6))
        idle = int(rng.integers(0, 2)) if workers > 2 and case % 3 == 0 else 0
        experts = int(rng.integers(1, (workers - idle) * spw + 1))  # often not divisible by the workers
        placement, weights = random_layout(rng, kind, workers, spw, experts, layers=int(rng.integers(1, 3)), idle=idle)
        scale = rng.choice([1, 3, 20, 200])
        counts = rng.integers(0, scale + 1, size=(placement.num_layers, experts))
        counts[rng.random(counts.shape) < 0.2] = 0
        check_against_numpy(placement, weights, counts)


def test_rows_equal_numpy_with_many_slots_per_worker_and_the_step_options():
    # 9..12 slots per worker: worker sums use numpy's pairwise order (8 accumulators)
    rng = np.random.default_rng(21)
    for case in range(40):
        workers, spw = int(rng.integers(3, 6)), int(rng.integers(9, 13))
        placement, weights = random_layout(rng, "mixed", workers, spw, int(rng.integers(workers, workers * spw // 2)))
        counts = rng.integers(0, 60, size=(1, placement.num_experts))
        options = [{}, {"sweeps": 0}, {"sweeps": 1, "moves": 0}, {"fallback": False},
                   {"sweeps": 30, "moves": 8}][case % 5]
        check_against_numpy(placement, weights, counts, **options)


@pytest.mark.parametrize("tokens,top_k", [(1, 1), (1, 3), (5, 3), (17, 1), (0, 2)])
def test_awkward_batches(tokens, top_k):
    # 7 experts on 4 workers x 3 slots (7 not divisible by 4); worker 3 holds nothing; expert 0
    # has a replica of two shards (0.3 / 0.7, workers 0 and 1) and a whole one (worker 2)
    phy2log = np.array([[0, 1, 2, 0, 3, 4, 0, 5, 6, -1, -1, -1]])
    width = np.array([[0.3, 1, 1, 0.7, 1, 1, 1, 1, 1, 0, 0, 0]])
    placement = Placement(phy2log, 7, 3, shard_width=width).validate()
    units = ReplicaUnits.of(placement)
    rng = np.random.default_rng(tokens * 10 + top_k)
    ids = np.array([rng.choice(7, size=top_k, replace=False) for _ in range(tokens)], dtype=np.int64)
    ids = ids.reshape(tokens, top_k)
    counts = np.bincount(ids.ravel(), minlength=7)
    check_against_numpy(placement, None, counts[None])
    device_units, rows_ER = device_rows(units, 0, None, counts)
    replica = replica_of_pairs(torch.as_tensor(ids), torch.as_tensor(rows_ER)).numpy()
    got = np.zeros_like(rows_ER)
    np.add.at(got, (ids.ravel(), replica.ravel()), 1)
    assert np.array_equal(got, rows_ER)


def test_zero_counts_and_single_replica_layers():
    placement = Placement(np.array([[0, 1, 2, -1, 3, 4]]), 5, 3).validate()  # nothing replicated
    check_against_numpy(placement, None, np.zeros((1, 5), dtype=np.int64))
    check_against_numpy(placement, None, np.array([[4, 0, 1, 0, 9]]))
    placement = Placement(np.array([[0, 1, 1, 0]]), 2, 2).validate()  # everything replicated
    check_against_numpy(placement, None, np.zeros((1, 2), dtype=np.int64))
    check_against_numpy(placement, None, np.array([[1, 0]]))


def test_replica_of_pairs_follows_numpy_and_each_replica_gets_its_rows():
    rng = np.random.default_rng(31)
    for case in range(60):
        workers, spw = int(rng.integers(2, 7)), int(rng.integers(1, 5))
        experts = int(rng.integers(2, min(9, workers * spw) + 1))
        placement, weights = random_layout(rng, ["whole", "sharded", "mixed"][case % 3], workers, spw, experts)
        num_experts = placement.num_experts
        top_k = int(rng.integers(1, min(3, num_experts) + 1))
        tokens = int(rng.integers(1, 40))
        ids = np.stack([rng.choice(num_experts, size=top_k, replace=False) for _ in range(tokens)])
        counts = np.bincount(ids.ravel(), minlength=num_experts)
        units = ReplicaUnits.of(placement)
        rows_S = split_batch(units, counts[None, None], weights)[0, 0]
        pair, slot = pairs_to_slots(ids, placement.phy2log[0], placement.replica_of_slot[0], rows_S, num_experts)
        expected_replica = np.full(ids.size, -1)
        expected_replica[pair] = placement.replica_of_slot[0, slot]
        # the batch's tokens split over 1-4 workers, in rank order; each routes its own pairs
        workers = int(rng.integers(1, 5))
        cuts = np.sort(rng.integers(0, tokens + 1, size=workers - 1))
        local_ids = np.split(ids, cuts)
        counts_WE = torch.as_tensor(np.stack([np.bincount(x.ravel(), minlength=num_experts) for x in local_ids]))
        device_units = DeviceReplicaUnits.from_units(units, 0, weights)
        replicas = []
        for rank, ids_TK in enumerate(local_ids):
            count_E, offset_E = global_rank_offsets(counts_WE, rank)
            assert np.array_equal(count_E.numpy(), counts)
            rows_ER = split_rows(device_units, count_E)  # every worker computes the same rows
            replica_TK = replica_of_pairs(torch.as_tensor(ids_TK), rows_ER, offset_E)
            assert replica_TK.shape == ids_TK.shape and replica_TK.dtype == torch.int64
            replicas.append(replica_TK.numpy().ravel())
        replica_X = np.concatenate(replicas)
        assert np.array_equal(replica_X, expected_replica)
        got = np.zeros_like(rows_ER.numpy())
        np.add.at(got, (ids.ravel(), replica_X), 1)
        assert np.array_equal(got, rows_ER.numpy())


def test_numpy_order_sum_matches_numpy_bit_for_bit():
    rng = np.random.default_rng(41)
    for n in [*range(0, 140), 255, 256, 257, 300, 1031]:
        x = rng.random((4, n)) * rng.choice([0.3, 1 / 3, 0.7, 1.0], size=(4, n)) * rng.integers(0, 99, size=(4, n))
        assert np.array_equal(_numpy_order_sum(torch.from_numpy(x)).numpy(), x.sum(axis=1))


def _layout_for_devices():
    rng = np.random.default_rng(61)
    placement, weights = random_layout(rng, "mixed", 6, 5, 17, max_replicas=4)
    counts = rng.integers(0, 50, size=17)
    ids = np.stack([rng.choice(17, size=3, replace=False) for _ in range(40)])
    return ReplicaUnits.of(placement), weights, counts, ids


def test_runs_on_the_meta_device():
    # every shape is known without reading data: the functions trace on "meta"
    units, weights, counts, ids = _layout_for_devices()
    device_units = DeviceReplicaUnits.from_units(units, 0, weights, device="meta")
    count_E = torch.as_tensor(counts, device="meta")
    rows_ER = split_rows(device_units, count_E)
    assert rows_ER.device.type == "meta" and rows_ER.shape == (17, device_units.present_QR.shape[1])
    offset_E = global_rank_offsets(torch.zeros((3, 17), dtype=torch.int64, device="meta"), 1)[1]
    replica_TK = replica_of_pairs(torch.as_tensor(ids, device="meta"), rows_ER, offset_E)
    assert replica_TK.shape == ids.shape and replica_TK.dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda_and_same_rows_as_cpu():
    units, weights, counts, ids = _layout_for_devices()
    device_units = DeviceReplicaUnits.from_units(units, 0, weights, device="cuda")
    count_E, ids_TK = torch.as_tensor(counts, device="cuda"), torch.as_tensor(ids, device="cuda")
    offset_E = torch.zeros_like(count_E)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows_ER = split_rows(device_units, count_E)
        replica_TK = replica_of_pairs(ids_TK, rows_ER, offset_E)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu_rows = split_rows(DeviceReplicaUnits.from_units(units, 0, weights), torch.as_tensor(counts))
    assert np.array_equal(rows_ER.cpu().numpy().sum(axis=1), counts)
    assert np.array_equal(rows_ER.cpu().numpy(), cpu_rows.numpy())  # small integers: no last-bit ties here
    assert replica_TK.shape == ids.shape
    # a CUDA graph cannot capture a host sync: capture once, replay on other counts
    static_E = count_E.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        split_rows(device_units, static_E)  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_rows_ER = split_rows(device_units, static_E)
    for seed in range(3):
        other = np.random.default_rng(seed).integers(0, 80, size=len(counts))
        static_E.copy_(torch.as_tensor(other))
        graph.replay()
        expected = split_rows(DeviceReplicaUnits.from_units(units, 0, weights), torch.as_tensor(other))
        assert np.array_equal(graph_rows_ER.cpu().numpy(), expected.numpy())


def test_rows_equal_numpy_where_the_fallback_and_the_moves_decide():
    # small batches on sharded layouts: the rounding can lose to the planned weights' rule
    rng = np.random.default_rng(7)
    fallback_used = moves_used = 0
    for case in range(600):
        workers, spw = int(rng.integers(2, 6)), int(rng.integers(1, 5))
        experts = int(rng.integers(1, workers * spw + 1))
        placement, weights = random_layout(rng, ["whole", "sharded", "mixed"][case % 3], workers, spw, experts)
        counts = rng.integers(0, rng.choice([2, 4, 10, 50]), size=(1, experts))
        units = ReplicaUnits.of(placement)
        for options in [{}, {"sweeps": 1, "moves": 0}]:
            units, rows = check_against_numpy(placement, weights, counts, **options)
            without = split_batch(units, counts[None], weights, fallback=False, **options)[0]
            fallback_used += not np.array_equal(rows, without)
        no_moves = split_batch(units, counts[None], weights, moves=0, fallback=False)[0]
        moves_used += not np.array_equal(split_batch(units, counts[None], weights, fallback=False)[0], no_moves)
    assert fallback_used >= 1 and moves_used >= 5, (fallback_used, moves_used)


@pytest.mark.parametrize("phy2log,width,counts,options", [
    # found by the search above: the rounded water-fill loses to the planned weights
    ([-1, 1, -1, 0, -1, 1, 0, -1, 1, -1, 0, -1, -1, 1, -1, -1, -1, -1, -1, 1],
     [0, 0.5, 0, 1, 0, 0.5, 0.25, 0, 1, 0, 0.75, 0, 0, 1, 0, 0, 0, 0, 0, 1], [2, 3], {}),
    ([2, 0, 1, 0, 3, 1, 4, 3], [1, 1, 0.3, 1, 0.3, 0.7, 1, 0.7], [1, 0, 1, 1, 1], {"sweeps": 1, "moves": 0}),
    ([3, 2, 0, 1, 0, 3, 3, 0, 3, 2], [1 / 3, 0.25, 1, 1, 0.25, 1 / 3, 1 / 3, 0.75, 1, 0.75], [1, 0, 1, 0],
     {"sweeps": 1, "moves": 0}),
])
def test_rows_equal_numpy_when_the_fallback_wins(phy2log, width, counts, options):
    spw = {20: 4, 8: 2, 10: 2}[len(phy2log)]
    placement = Placement(np.array([phy2log]), len(counts), spw, shard_width=np.array([width], dtype=float)).validate()
    counts = np.array([counts])
    units, rows = check_against_numpy(placement, None, counts, **options)
    assert not np.array_equal(rows, split_batch(units, counts[None], None, fallback=False, **options)[0])


def test_float_shares_and_worker_compute_equal_numpy_bit_for_bit():
    # the integer rows hide most last-bit differences; the float steps are compared exactly here
    from moeray.comm.batch_split import _water_fill_sweeps, _worker_compute
    from placement.batch_split import _cell_sums, _water_fill_sweeps as numpy_sweeps, worker_compute

    rng = np.random.default_rng(71)
    for case in range(150):
        workers, spw = int(rng.integers(2, 7)), int(rng.integers(1, 11))
        experts = int(rng.integers(2, workers * spw + 1))
        placement, weights = random_layout(rng, ["sharded", "mixed"][case % 2], workers, spw, experts)
        units = ReplicaUnits.of(placement)
        if units.num_groups == 0:
            continue
        counts = rng.integers(0, 300, size=(1, 1, experts))
        num_cells = workers + 1
        fixed_cell = units.fixed_slot_X // spw
        fixed = _cell_sums(counts[:, 0, units.fixed_expert_X] * units.fixed_width_X, fixed_cell, num_cells)
        total = counts[:, units.layer_Q, units.expert_Q].astype(np.float64)
        expected = numpy_sweeps(units, fixed, total, units.replica_weights_QR(weights), num_cells, 7)[0]
        device_units = DeviceReplicaUnits.from_units(units, 0, weights)
        count_E = torch.as_tensor(counts[0, 0])
        shares = _water_fill_sweeps(device_units, count_E, count_E[device_units.expert_Q], 7)
        assert np.array_equal(shares.numpy(), expected)
        rows_QR = torch.as_tensor(rng.integers(0, 50, size=expected.shape)) * device_units.present_QR
        rows_S = split_batch(units, counts, weights, sweeps=0)[0, 0]  # any rows: the planned ones, then random
        for rows in (None, rows_QR):
            if rows is None:
                rows_ER = split_rows(device_units, count_E, sweeps=0)
                rows = rows_ER[device_units.expert_Q]
            else:
                slot = np.where(units.slot_QRJ >= 0, units.slot_QRJ, units.num_slots)
                rows_S = np.zeros(units.num_slots + 1, dtype=np.int64)
                rows_S[units.fixed_slot_X] = counts[0, 0, units.fixed_expert_X]
                rows_S[slot] = np.broadcast_to(rows.numpy()[..., None], slot.shape)
                rows_S = rows_S[:-1]
            assert np.array_equal(_worker_compute(device_units, count_E, rows).numpy(),
                                  worker_compute(units, rows_S[None, None])[0, 0])

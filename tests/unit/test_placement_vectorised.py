"""Direct tests of placement/'s vectorised parts against slow loops (before: only through plan())."""

import itertools

import numpy as np
import pytest

from placement.dispatch import occurrence_rank, rows_from_weights, split_to_slots
from placement.layout import Placement, expert_counts, take_rows
from placement.metrics import equal_replica_weights, worker_loads
from placement.packing import greedy_pack, repair_duplicates, replica_counts, replica_items
from placement.reassign import match_to_current, reassign_replicas
from placement.replan import fresh_lower_bound, permute_weights
from placement.replica_weights import ReplicaGroups, balance_replica_weights, water_fill, water_fill_pairs
from placement.swaps import best_pair_swaps, holds_map, pair_swap_maxima, refine_by_swaps, swap_copy_cost


def random_map(rng, layers, workers, spw, experts):
    """[L, S] slot maps: every expert once, the rest replicas / free, never twice on a worker."""
    out = np.full((layers, workers * spw), -1)
    for layer in range(layers):
        order = rng.permutation(workers * spw)
        out[layer, order[:experts]] = np.arange(experts)
        for slot in order[experts:]:
            expert = rng.integers(experts)
            lo = slot // spw * spw
            if rng.random() < 0.7 and expert not in out[layer, lo: lo + spw]:
                out[layer, slot] = expert
    return out


# ---- layout / metrics -------------------------------------------------------------------------------


def test_expert_counts_take_rows_log2phy_and_equal_weights():
    rng = np.random.default_rng(0)
    phy2log = random_map(rng, 4, 5, 3, 9)
    counts = expert_counts(phy2log, 9)
    placement = Placement(phy2log, 9, 3)
    for layer in range(4):
        for expert in range(9):
            slots = [s for s in range(15) if phy2log[layer, s] == expert]
            assert counts[layer, expert] == len(slots)
            assert placement.log2phy[layer, expert, : len(slots)].tolist() == slots
            assert (placement.log2phy[layer, expert, len(slots):] == -1).all()
    index = rng.integers(0, 9, size=(4, 6))
    assert np.array_equal(take_rows(counts, index), np.take_along_axis(counts, index, axis=1))
    weights = equal_replica_weights(phy2log, 9)
    assert np.allclose(weights, np.where(phy2log >= 0, 1 / np.maximum(take_rows(counts, np.maximum(phy2log, 0)), 1), 0))


def test_occurrence_rank_and_rows_from_weights_match_loops():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 5, size=60)
    rank, count = occurrence_rank(ids, 5)
    seen = {}
    for i, e in enumerate(ids.tolist()):
        assert rank[i] == seen.get(e, 0)
        seen[e] = seen.get(e, 0) + 1
    assert count.tolist() == [seen.get(e, 0) for e in range(5)]
    log2phy = np.array([[0, 3, 5], [1, -1, -1], [2, 4, -1], [6, -1, -1], [7, 8, -1]])
    for trial in range(200):
        weights = rng.random((5, 3)) * (log2phy >= 0)
        if trial % 3 == 0:
            weights = np.round(weights * 4) / 4  # boundaries that land exactly on pairs
        weights[weights.sum(axis=1) == 0, 0] = 1
        weights /= weights.sum(axis=1, keepdims=True)
        ids = rng.integers(0, 5, size=(int(rng.integers(0, 30)), 3))
        expected = np.bincount(split_to_slots(ids, log2phy, weights).ravel(), minlength=9)
        got = rows_from_weights(np.bincount(ids.ravel(), minlength=5)[None], log2phy[None], weights[None], 9)[0]
        assert np.array_equal(got, expected)


# ---- packing ----------------------------------------------------------------------------------------


def test_replica_counts_equal_the_one_slot_at_a_time_greedy():
    rng = np.random.default_rng(2)
    for _ in range(20):
        experts, slots, cap = int(rng.integers(2, 12)), 0, int(rng.integers(1, 5))
        slots = int(rng.integers(experts, experts * 3))
        load = rng.lognormal(0, 1, size=(3, experts)) * 100
        got = replica_counts(load, slots, max_replicas=cap)
        for layer in range(3):
            count = np.ones(experts, dtype=int)
            for _ in range(min(slots, experts * cap) - experts):
                per = np.where(count < cap, load[layer] / count, -np.inf)
                count[int(np.argmax(per))] += 1
            assert np.array_equal(got[layer], count)


def test_replica_items_and_greedy_pack_follow_their_rules():
    rng = np.random.default_rng(3)
    load = rng.lognormal(0, 1, size=(4, 10)) * 100
    count = replica_counts(load, 16, max_replicas=4)
    expert_LI, weight_LI = replica_items(load, count, 16)
    for layer in range(4):
        assert (np.diff(weight_LI[layer]) <= 1e-12).all()  # heaviest first
        assert np.array_equal(np.bincount(expert_LI[layer][expert_LI[layer] >= 0], minlength=10), count[layer])
    packed = greedy_pack(expert_LI, weight_LI, 4, 4)
    fixed = repair_duplicates(packed, 4, 10)
    for layer in range(4):
        assert sorted(fixed[layer].tolist()) == sorted(expert_LI[layer].tolist())  # same items
    Placement(fixed, 10, 4).validate()
    # the first round is exactly "heaviest item to the lightest (empty) worker", one per worker
    assert np.array_equal(packed.reshape(4, 4, 4)[:, :, 0], expert_LI[:, :4])


def test_repair_duplicates_removes_every_clash_and_keeps_the_multiset():
    phy2log = np.array([[0, 0, 1, 2, 3, 4], [5, 5, 1, 2, 3, 4]])
    fixed = repair_duplicates(phy2log, 3, 6)
    Placement(fixed, 6, 3)  # constructs
    for layer in range(2):
        assert sorted(fixed[layer].tolist()) == sorted(phy2log[layer].tolist())
        for worker in range(2):
            held = fixed[layer, worker * 3:(worker + 1) * 3]
            assert len(set(held.tolist())) == 3
    with pytest.raises(ValueError, match="without a duplicate"):
        repair_duplicates(np.array([[0, 0, 0, 0]]), 2, 1)


# ---- swaps ------------------------------------------------------------------------------------------


def test_holds_map_and_swap_scores_match_loops():
    rng = np.random.default_rng(4)
    layers, workers, spw, experts = 3, 4, 3, 8
    phy2log = random_map(rng, layers, workers, spw, experts)
    holds = holds_map(phy2log, spw, experts)
    for l, w, e in itertools.product(range(layers), range(workers), range(experts + 1)):
        assert holds[l, w, e] == (e < experts and e in phy2log[l, w * spw:(w + 1) * spw])
    tokens = rng.random(phy2log.shape) * (phy2log >= 0)
    loads = tokens.reshape(layers, workers, spw).sum(axis=2)
    col = np.where(phy2log >= 0, phy2log, experts)
    layer_X, a_X, b_X = np.array([0, 1, 2, 2]), np.array([0, 1, 3, 2]), np.array([1, 3, 0, 1])

    def cols(w_X):
        return col.reshape(layers, workers, spw)[layer_X, w_X], tokens.reshape(layers, workers, spw)[layer_X, w_X]

    (ca, wa), (cb, wb) = cols(a_X), cols(b_X)
    best, score = best_pair_swaps(holds, layer_X, a_X, b_X, loads[layer_X, a_X], loads[layer_X, b_X], ca, wa, cb, wb)
    maxima = pair_swap_maxima(holds, layer_X, a_X, b_X, loads[layer_X, a_X], loads[layer_X, b_X], ca, wa, cb, wb, np.empty((4, spw, spw)))
    for x in range(4):
        l, a, b = layer_X[x], a_X[x], b_X[x]
        for i, j in itertools.product(range(spw), range(spw)):
            ea, eb = phy2log[l, a * spw + i], phy2log[l, b * spw + j]
            legal = not (ea >= 0 and holds[l, b, ea]) and not (eb >= 0 and holds[l, a, eb])
            new_a = loads[l, a] - tokens[l, a * spw + i] + tokens[l, b * spw + j]
            new_b = loads[l, b] + tokens[l, a * spw + i] - tokens[l, b * spw + j]
            if legal:
                assert np.isclose(maxima[x, i * spw + j], max(new_a, new_b))
                assert np.isclose(score[x, i * spw + j], abs(max(new_a, new_b) - (loads[l, a] + loads[l, b]) / 2))
            else:
                assert np.isinf(maxima[x, i * spw + j])
        assert best[x] == np.argmin(score[x])


def _best_single_swap(phy2log_S, tokens_S, spw, partners):
    """Slow: the busiest worker's best legal swap with any of its `partners` lightest peers."""
    workers = len(phy2log_S) // spw
    loads = tokens_S.reshape(workers, spw).sum(axis=1)
    a = int(np.argmax(loads))
    peers = [w for w in np.argsort(loads, kind="stable") if w != a][:partners]
    best = (loads[a], None)
    for b in peers:
        for i, j in itertools.product(range(spw), range(spw)):
            sa, sb = a * spw + i, b * spw + j
            ea, eb = phy2log_S[sa], phy2log_S[sb]
            if (ea >= 0 and ea in phy2log_S[b * spw:(b + 1) * spw]) or (eb >= 0 and eb in phy2log_S[a * spw:(a + 1) * spw]):
                continue
            new_max = max(loads[a] - tokens_S[sa] + tokens_S[sb], loads[b] + tokens_S[sa] - tokens_S[sb])
            if new_max < best[0] * (1 - 1e-9):
                best = (new_max, (sa, sb))
    return best


def test_one_round_of_refine_by_swaps_takes_the_best_swap():
    rng = np.random.default_rng(5)
    for _ in range(15):
        phy2log = random_map(rng, 1, 5, 3, 11)
        tokens = rng.lognormal(0, 1, size=phy2log.shape) * (phy2log >= 0)
        new_map, new_tokens, swaps = refine_by_swaps(phy2log, tokens, 3, 11, max_swaps=1, num_partners=4)
        best_max, pair = _best_single_swap(phy2log[0], tokens[0], 3, 4)
        before, after = tokens.reshape(5, 3).sum(axis=1), new_tokens.reshape(5, 3).sum(axis=1)
        moved = np.flatnonzero(~np.isclose(before, after)) if swaps[0] else [int(np.argmax(before))]
        assert np.isclose(after[moved].max(), best_max)  # the pair's new maximum is the best one
        assert swaps[0] == (pair is not None)
        Placement(new_map, 11, 3).validate()


def _copies(phy2log_S, origin_S):
    return int(((phy2log_S != origin_S) & (phy2log_S >= 0)).sum())


def test_swap_copy_cost_matches_a_recount():
    rng = np.random.default_rng(11)
    layers, workers, spw, experts = 2, 4, 3, 8
    for _ in range(10):
        origin = random_map(rng, layers, workers, spw, experts)
        now = origin.copy()
        for layer in range(layers):  # a few swaps (legal or not: the cost only counts copies)
            for _ in range(3):
                i, j = rng.integers(workers * spw, size=2)
                now[layer, [i, j]] = now[layer, [j, i]]
        col, ocol = np.where(now >= 0, now, experts), np.where(origin >= 0, origin, experts)
        layer_X, a_X, b_X = np.array([0, 0, 1, 1]), np.array([0, 2, 1, 3]), np.array([1, 3, 0, 2])

        def block(arr, w_X):
            return arr.reshape(layers, workers, spw)[layer_X, w_X]

        cost = swap_copy_cost(block(col, a_X), block(ocol, a_X), block(col, b_X), block(ocol, b_X), experts)
        for x in range(len(layer_X)):
            l, a, b = layer_X[x], a_X[x], b_X[x]
            for i, j in itertools.product(range(spw), range(spw)):
                swapped = now[l].copy()
                sa, sb = a * spw + i, b * spw + j
                swapped[[sa, sb]] = swapped[[sb, sa]]
                assert cost[x, i * spw + j] == _copies(swapped, origin[l]) - _copies(now[l], origin[l])


def test_penalised_swap_round_takes_the_best_scored_swap():
    """One round with a copy penalty: the improving swap of the busiest worker with the smallest
    pair max + penalty x change in copies (slow loop oracle)."""
    rng = np.random.default_rng(12)
    workers, spw, experts, partners = 5, 3, 11, 4
    for trial in range(20):
        origin = random_map(rng, 1, workers, spw, experts)
        origin_tokens = rng.lognormal(0, 1, size=origin.shape) * (origin >= 0)
        now, _, _ = refine_by_swaps(origin, origin_tokens, spw, experts, max_swaps=2)  # an edit under way: some slots moved
        tokens = rng.lognormal(0, 1, size=now.shape) * (now >= 0)
        penalty = float(tokens.sum() / workers * (0.05 if trial % 2 else 0.5))
        new_map, new_tokens, swaps = refine_by_swaps(now, tokens, spw, experts, max_swaps=1, num_partners=partners,
                                                      origin_LS=origin, copy_penalty_LAYERS=np.array([penalty]))
        loads = tokens[0].reshape(workers, spw).sum(axis=1)
        a = int(np.argmax(loads))
        peers = [w for w in np.argsort(loads, kind="stable") if w != a][:partners]
        best = (np.inf, None)
        for b in peers:
            for i, j in itertools.product(range(spw), range(spw)):
                sa, sb = a * spw + i, b * spw + j
                ea, eb = now[0, sa], now[0, sb]
                if (ea >= 0 and ea in now[0, b * spw:(b + 1) * spw]) or (eb >= 0 and eb in now[0, a * spw:(a + 1) * spw]):
                    continue
                new_max = max(loads[a] - tokens[0, sa] + tokens[0, sb], loads[b] + tokens[0, sa] - tokens[0, sb])
                if new_max >= loads[a] * (1 - 1e-9):
                    continue
                swapped = now[0].copy()
                swapped[[sa, sb]] = swapped[[sb, sa]]
                score = new_max + penalty * (_copies(swapped, origin[0]) - _copies(now[0], origin[0]))
                if score < best[0] - 1e-9:
                    best = (score, swapped)
        assert swaps[0] == (best[1] is not None)
        if best[1] is not None:
            got = new_tokens[0].reshape(workers, spw).sum(axis=1)
            changed = np.flatnonzero(new_map[0] != now[0])
            expected = np.flatnonzero(best[1] != now[0])
            # the oracle's swap, or one with the same score (ties)
            if not np.array_equal(changed, expected):
                pair_max = max(got[w] for w in {int(c) // spw for c in changed})
                assert np.isclose(pair_max + penalty * (_copies(new_map[0], origin[0]) - _copies(now[0], origin[0])), best[0])
        Placement(new_map, experts, spw).validate()


def test_edit_variants_never_worse_than_the_first_edit():
    from placement.layout import Topology
    from placement.planner import PlannerOptions, fresh_plan
    from placement.replan import fresh_lower_bound, incremental, slot_copies

    rng = np.random.default_rng(13)
    topo = Topology(1, 8, 5)
    load_a = rng.lognormal(0, 1, size=(12, 32)) * 100
    load_b = rng.lognormal(0, 1, size=(12, 32)) * 100  # unrelated: big edits
    plain = PlannerOptions(edit_variants=())
    varied = PlannerOptions(edit_variants_min_copies=0.0)
    current, _ = fresh_plan(load_a, topo, plain)
    weights = balance_replica_weights(load_b, current, 5)
    count = replica_counts(load_b, topo.num_slots, max_replicas=topo.num_workers)
    reference = fresh_lower_bound(load_b, count, topo.num_workers)
    first_LS, _, first_imb = incremental(load_b, current, weights, reference, count, topo, plain)
    best_LS, best_w, best_imb = incremental(load_b, current, weights, reference, count, topo, varied)
    assert (best_imb <= first_imb * (1 + 1e-12)).all()
    assert (slot_copies(current, best_LS) <= slot_copies(current, first_LS)).all()
    assert (slot_copies(current, best_LS) < slot_copies(current, first_LS)).any()
    Placement(best_LS, 32, 5).validate()
    assert np.allclose(worker_loads(load_b, best_LS, 5, best_w).max(axis=1) / (load_b.sum(axis=1) / 8), best_imb)


# ---- split weights ----------------------------------------------------------------------------------


def _bisection_fill(base, total):
    lo, hi = min(base), max(base) + total
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(mid - base, 0).sum() < total else (lo, mid)
    return np.maximum(lo - base, 0)


def test_water_fills_match_bisection():
    rng = np.random.default_rng(6)
    base, total = rng.random((40, 4)) * 10, rng.random(40) * 15
    shares = water_fill(base, total)
    for x in range(40):
        assert np.allclose(shares[x], _bisection_fill(base[x], total[x]), atol=1e-7)
    out_a, out_b = np.empty(40), np.empty(40)
    water_fill_pairs(base[:, 0], base[:, 1], total, out_a, out_b)
    assert np.allclose(np.c_[out_a, out_b], water_fill(base[:, :2], total))


def test_replica_groups_list_every_replicated_expert_once():
    rng = np.random.default_rng(7)
    phy2log = random_map(rng, 3, 4, 4, 9)
    counts = take_rows(expert_counts(phy2log, 9), np.maximum(phy2log, 0)) * (phy2log >= 0)
    groups = ReplicaGroups(phy2log, counts, 9)
    expected = {(l, e) for l in range(3) for e in range(9) if (phy2log[l] == e).sum() >= 2}
    assert set(zip(groups.layer_Q.tolist(), groups.expert_Q.tolist())) == expected and groups.num_groups == len(expected)
    present = groups.slot_X >= 0
    found = {(l, s) for l, s in zip(groups.layer_X[present].tolist(), groups.slot_X[present].tolist())}
    assert found == {(l, s) for l in range(3) for s in range(16) if counts[l, s] >= 2}


def test_balance_replica_weights_is_a_valid_split_never_worse_than_equal():
    rng = np.random.default_rng(8)
    for _ in range(10):
        phy2log = random_map(rng, 2, 5, 4, 12)
        load = rng.lognormal(0, 1, size=(2, 12)) * 100
        weights = balance_replica_weights(load, phy2log, 4)
        sums = [np.bincount(phy2log[l][phy2log[l] >= 0], weights[l][phy2log[l] >= 0], minlength=12) for l in range(2)]
        assert np.allclose(sums, 1) and (weights >= 0).all() and (weights[phy2log < 0] == 0).all()
        ours = worker_loads(load, phy2log, 4, weights).max(axis=1)
        equal = worker_loads(load, phy2log, 4).max(axis=1)
        assert (ours <= equal + 1e-9).all()


# ---- re-plan helpers --------------------------------------------------------------------------------


def test_match_to_current_permutes_packs_and_keeps_slot_indices():
    rng = np.random.default_rng(9)
    for _ in range(10):
        current = random_map(rng, 1, 4, 3, 9)
        new = random_map(rng, 1, 4, 3, 9)
        matched = match_to_current(new, current, 3)
        packs = sorted(tuple(sorted(new[0, w * 3:(w + 1) * 3].tolist())) for w in range(4))
        assert sorted(tuple(sorted(matched[0, w * 3:(w + 1) * 3].tolist())) for w in range(4)) == packs
        stayed = (matched == current) & (matched >= 0)
        for w, i in zip(*np.divmod(np.flatnonzero(((matched >= 0) & ~stayed)[0]), 3)):
            expert = matched[0, w * 3 + i]
            assert expert not in current[0, w * 3:(w + 1) * 3]  # an expert kept on a worker keeps its index
        overlap = sum(len(set(matched[0, w * 3:(w + 1) * 3]) & set(current[0, w * 3:(w + 1) * 3]) - {-1}) for w in range(4))
        best = max(sum(len(set(new[0, p * 3:(p + 1) * 3]) & set(current[0, w * 3:(w + 1) * 3]) - {-1}) for w, p in enumerate(perm))
                   for perm in itertools.permutations(range(4)))
        assert overlap >= best - 2  # greedy matching: near the best assignment of packs to workers


def test_permute_weights_and_the_fresh_lower_bound():
    from_LS = np.array([[0, 1, 0, 2, 1, 3]])
    weights = np.array([[0.3, 0.6, 0.7, 1.0, 0.4, 1.0]])
    to_LS = np.array([[1, 0, 3, 0, 2, 1]])
    out = permute_weights(from_LS, weights, to_LS)
    assert np.allclose(out, [[0.6, 0.3, 1.0, 0.7, 1.0, 0.4]])  # the k-th slot of e takes the k-th weight of e
    load = np.array([[10.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    bound = fresh_lower_bound(load, np.array([[2, 1, 1, 1], [1, 1, 1, 1]]), 2)
    assert np.allclose(bound, [max(1, 5 / 8), 1.0])
    assert np.allclose(fresh_lower_bound(load[:1], np.array([[1, 1, 1, 1]]), 2), 10 / 8)


def test_reassign_replicas_gives_needy_experts_slots_without_breaking_invariants():
    rng = np.random.default_rng(10)
    phy2log = random_map(rng, 3, 4, 4, 10)
    load = rng.lognormal(0, 1.2, size=(3, 10)) * 100
    edited = reassign_replicas(load, phy2log, 4)
    Placement(edited, 10, 4).validate()
    before = (load / np.maximum(expert_counts(phy2log, 10), 1)).max(axis=1)
    after = (load / np.maximum(expert_counts(edited, 10), 1)).max(axis=1)
    assert (after <= before + 1e-12).all() and (after < before).any()

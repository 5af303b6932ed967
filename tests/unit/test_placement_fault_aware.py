"""Fault-aware planning (placement.fault_aware): slow oracles of the vectorised pieces, and the
properties of plan(..., fault_aware=...): no expert twice on a worker, every expert kept, the
surviving load after any single-worker loss no worse than the plain plan's, balance kept."""

from collections import Counter

import numpy as np
import pytest

from placement.fault_aware import (
    FaultAwareOptions,
    add_second_copies,
    protected_set,
    surviving_after_node_loss,
    surviving_after_worker_loss,
)
from placement.fault_moves import even_exposure_by_swaps, permute_packs_by_exposure, spread_over_nodes
from placement.layout import Placement, Topology, expert_counts
from placement.metrics import slot_loads, surviving_load_after_worker_loss, worker_loads
from placement.planner import PlannerOptions, plan
from placement.traces import real_traces
from tests.helpers import random_replicated_placement

FAULT_AWARE = FaultAwareOptions()

# (experts, topology): experts not divisible by workers, 1 redundant slot, 2 workers, several nodes
AWKWARD = [
    (10, Topology.flat(3, 4)),
    (7, Topology.flat(2, 4)),
    (15, Topology.flat(2, 8)),
    (13, Topology(3, 2, 3)),
    (24, Topology(2, 4, 4)),
    (40, Topology(4, 2, 6)),
    (20, Topology(4, 1, 6)),  # one worker per node: step 4 cannot even anything out
]


def skewed_load(seed, layers, experts, sigma=1.0, zeros=False):
    rng = np.random.default_rng(seed)
    load = rng.lognormal(0.0, sigma, size=(layers, experts)) * 1000
    if zeros:
        load[:, rng.random(experts) < 0.2] = 0.0
    return load


def workers_of(row_S, expert, spw):
    return [s // spw for s in np.flatnonzero(row_S == expert)]


def check_invariants(result, load, topo):
    """No expert twice on one worker (by a loop), every expert >= 1 copy, split weights sum to 1."""
    placement = result.placement.validate()
    spw = topo.slots_per_worker
    for layer in range(load.shape[0]):
        row = placement.phy2log[layer]
        for expert in range(load.shape[1]):
            workers = workers_of(row, expert, spw)
            assert len(workers) >= 1, f"layer {layer}: expert {expert} lost its last copy"
            assert len(set(workers)) == len(workers), f"layer {layer}: expert {expert} twice on a worker"
            assert np.isclose(result.replica_weights[layer, row == expert].sum(), 1.0)
    assert (result.replica_weights[placement.phy2log < 0] == 0).all()


# ---- figures and small pieces against slow loops --------------------------------------------------


def node_loss_by_loop(load, placement, topo):
    """Per node: load of the experts that keep a replica with no slot on that node (shards: a replica)."""
    out = []
    for lost in range(topo.num_nodes):
        kept = 0.0
        for layer in range(placement.num_layers):
            for expert in range(placement.num_experts):
                broken, replicas = set(), set()
                for slot in np.flatnonzero(placement.phy2log[layer] == expert):
                    replica = int(placement.replica_of_slot[layer, slot])
                    replicas.add(replica)
                    if topo.node_of_worker(slot // topo.slots_per_worker) == lost:
                        broken.add(replica)
                kept += load[layer, expert] if replicas - broken else 0.0
        out.append(kept / load.sum())
    return np.array(out)


@pytest.mark.parametrize("seed", range(4))
def test_surviving_figures_match_the_loops(seed):
    topo = Topology(2, 2, 4)
    placement = random_replicated_placement(3, 11, topo.num_workers, topo.slots_per_worker, seed=seed)
    load = np.random.default_rng(seed).random((3, 11)) * (np.arange(11) % 3 > 0)  # some zero-load experts
    np.testing.assert_allclose(surviving_after_worker_loss(load, placement), surviving_load_after_worker_loss(load, placement))
    np.testing.assert_allclose(surviving_after_node_loss(load, placement, topo), node_loss_by_loop(load, placement, topo))


def test_surviving_figures_count_a_replica_of_shards_once():
    # expert 0: shards (0.5 | 0.5) on workers 0 and 1 = one replica, and a whole replica on worker 2;
    # expert 1 whole on worker 1; expert 2 whole on worker 2
    topo = Topology(3, 1, 2)
    placement = Placement(np.array([[0, -1, 0, 1, 0, 2]]), 3, 2, shard_width=np.array([[0.5, 0, 0.5, 1, 1, 1]]))
    load = np.array([[50.0, 30.0, 20.0]])
    want = surviving_load_after_worker_loss(load, placement)
    np.testing.assert_allclose(want, [1.0, 0.7, 0.8])
    np.testing.assert_allclose(surviving_after_worker_loss(load, placement), want)
    np.testing.assert_allclose(surviving_after_node_loss(load, placement, topo), want)  # one worker per node


def protected_by_loop(load_E, share, at_least):
    order = sorted(range(len(load_E)), key=lambda e: (-load_E[e], e))
    chosen, hotter = set(), 0.0
    for rank, expert in enumerate(order):
        if hotter < share * load_E.sum() * (1 - 1e-9) or rank < at_least:
            chosen.add(expert)
        hotter += load_E[expert]
    return chosen


@pytest.mark.parametrize("share,at_least", [(1.0, 0), (0.5, 0), (0.0, 3), (0.8, 5), (0.0, 0)])
def test_protected_set_is_the_hottest_prefix(share, at_least):
    load = skewed_load(1, 4, 12, zeros=True)
    load[0, :4] = 7.0  # ties
    got = protected_set(load, FaultAwareOptions(min_surviving_load=share, protected_experts=at_least))
    for layer in range(4):
        assert set(np.flatnonzero(got[layer]).tolist()) == protected_by_loop(load[layer], share, at_least)


def second_copies_by_loop(load, phy2log, topo, protected, cap, prefer_other_node, tokens=None, limit=None):
    """Step 1 of placement.fault_aware one expert at a time: the hottest needy expert takes the
    eligible slot of lowest (donor cost, load of its worker afterwards (+ a penalty on its own node
    when another is preferred), slot index). With `limit`, no worker the donation touches (the new
    copy's, the donor's other ones, which share the donated slot's tokens) may end above it."""
    out = phy2log.copy()
    spw = topo.slots_per_worker
    node = lambda slot: int(topo.node_of_worker(slot // spw))  # noqa: E731
    for layer, row in enumerate(out):
        counts = Counter(row[row >= 0].tolist())
        tok = [load[layer, g] / counts[g] if g >= 0 else 0.0 for g in row] if tokens is None else list(tokens[layer])
        stuck = set()
        while True:
            counts = Counter(row[row >= 0].tolist())
            needy = [e for e in range(load.shape[1]) if protected[layer, e] and counts[e] == 1 and e not in stuck]
            if not needy:
                break
            expert = max(needy, key=lambda e: (load[layer, e], -e))
            home_slot = int(np.flatnonzero(row == expert)[0])
            worker_load = lambda w: sum(tok[w * spw:(w + 1) * spw])  # noqa: E731
            best, any_donor = None, False
            for slot, donor in enumerate(row):
                if donor >= 0:
                    spare = counts[donor] >= 3 or (counts[donor] == 2 and not protected[layer, donor])
                    cost = load[layer, donor] / max(counts[donor] - 1, 1)
                    if not spare or cost > cap[layer] * (1 + 1e-9):
                        continue
                else:
                    cost = 0.0
                any_donor = True
                worker = slot // spw
                if expert in row[worker * spw:(worker + 1) * spw]:
                    continue
                after = worker_load(worker) - tok[slot] + load[layer, expert] / 2
                if limit is not None:
                    holders = [s // spw for s in np.flatnonzero(row == donor)] if donor >= 0 else []
                    rise = max((worker_load(w) for w in holders), default=-np.inf) + tok[slot] / max(counts[donor] - 1, 1)
                    if max(after, rise if donor >= 0 else -np.inf) > limit[layer] * (1 + 1e-9):
                        continue
                same = node(slot) == node(home_slot)
                after += (2 * load[layer].sum() + 1) if prefer_other_node and same else 0.0
                key = (cost, after, slot)
                best = key if best is None or key < best else best
            if not any_donor:
                break
            if best is None:
                stuck.add(expert)
                continue
            slot, donor = best[2], row[best[2]]
            if donor >= 0:
                for other in np.flatnonzero(row == donor):
                    if other != slot:
                        tok[other] += tok[slot] / (counts[donor] - 1)
            tok[slot] = tok[home_slot] = load[layer, expert] / 2
            row[slot] = expert
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prefer_other_node", [False, True])
@pytest.mark.parametrize("limited", [False, True])
def test_add_second_copies_matches_the_loop(seed, prefer_other_node, limited):
    topo = [Topology(2, 2, 4), Topology.flat(3, 5), Topology(3, 1, 6)][seed % 3]
    experts = [11, 12, 9][seed % 3]
    rng = np.random.default_rng(seed)
    # loads in multiples of 840 keep load / count exact for counts <= 8: ties break alike
    load = rng.integers(0, 12, size=(3, experts)).astype(np.float64) * 840
    placement = random_replicated_placement(3, experts, topo.num_workers, topo.slots_per_worker, seed=seed)
    phy2log = placement.phy2log.copy()
    phy2log[rng.random(phy2log.shape) < 0.1] = -1  # some free slots, maybe some experts gone
    protected = rng.random((3, experts)) < 0.7
    cap = load.max(axis=1) * rng.choice([0.2, 0.5, 2.0])
    extra = ()
    if limited:  # the tokens of some uneven split, a limit some workers are above already
        tokens = slot_loads(load, phy2log) * rng.choice([0.5, 1.0, 1.5], size=phy2log.shape)
        extra = (tokens, np.median(tokens.reshape(3, topo.num_workers, -1).sum(axis=2), axis=1) * 1.2)
    args = (load, phy2log, topo, protected, cap, prefer_other_node, *extra)
    got = add_second_copies(*args)
    np.testing.assert_array_equal(got, second_copies_by_loop(*args))
    assert (expert_counts(got, experts)[protected & (expert_counts(phy2log, experts) == 1)] <= 2).all()


def test_permute_packs_matches_the_loop_and_only_moves_packs_inside_nodes():
    topo = Topology(2, 3, 4)
    load = skewed_load(5, 5, 17)
    plain = plan(load, topo)
    phy2log = plain.placement.phy2log
    order = permute_packs_by_exposure(phy2log, load, topo)
    counts = expert_counts(phy2log, 17)
    exposed = np.where((phy2log >= 0) & (np.take_along_axis(counts, np.maximum(phy2log, 0), axis=1) == 1),
                       np.take_along_axis(load, np.maximum(phy2log, 0), axis=1), 0.0)
    pack = exposed.reshape(5, 2, 3, 4).sum(axis=3)
    want = np.empty((5, 2, 3, 4), dtype=np.int64)
    so_far = np.zeros((2, 3))
    for layer in sorted(range(5), key=lambda x: (-max(pack[x, n].max() - pack[x, n].min() for n in range(2)), x)):
        for n in range(2):
            packs = sorted(range(3), key=lambda p: (-pack[layer, n, p], p))
            workers = sorted(range(3), key=lambda w: (so_far[n, w], w))
            for p, w in zip(packs, workers):
                want[layer, n, w] = (n * 3 + p) * 4 + np.arange(4)
                so_far[n, w] += pack[layer, n, p]
    np.testing.assert_array_equal(order, want.reshape(5, -1))
    moved = np.take_along_axis(phy2log, order, axis=1)
    loads = worker_loads(load, phy2log, 4, plain.replica_weights)
    moved_loads = worker_loads(load, moved, 4, np.take_along_axis(plain.replica_weights, order, axis=1))
    np.testing.assert_allclose(np.sort(moved_loads, axis=1), np.sort(loads, axis=1))
    node_of_slot = np.arange(24) // 12
    assert (node_of_slot[order] == node_of_slot).all()


@pytest.mark.parametrize("experts,topo", AWKWARD)
def test_swap_passes_keep_counts_workers_and_the_busiest(experts, topo):
    load = skewed_load(experts, 4, experts, zeros=True)
    plain = plan(load, topo)
    phy2log, spw = plain.placement.phy2log, topo.slots_per_worker
    tokens = slot_loads(load, phy2log, plain.replica_weights)
    busiest = tokens.reshape(4, topo.num_workers, spw).sum(axis=2).max(axis=1)
    single = lambda p2l: [(expert_counts(p2l, experts)[l] == 1) for l in range(4)]  # noqa: E731

    def spans_one_node(p2l):
        counts = expert_counts(p2l, experts)
        return sum(len({int(topo.node_of_worker(w)) for w in workers_of(p2l[l], e, spw)}) == 1
                   for l in range(4) for e in range(experts) if counts[l, e] >= 2)

    def exposure(p2l, tok):
        return [sum(tok[l, s] for l in range(4) for s in range(w * spw, (w + 1) * spw) if p2l[l, s] >= 0 and single(p2l)[l][p2l[l, s]])
                for w in range(topo.num_workers)]

    spread, spread_tokens = spread_over_nodes(phy2log, tokens, topo, experts)
    evened, evened_tokens = even_exposure_by_swaps(spread, spread_tokens, topo, experts)
    spread_busiest = spread_tokens.reshape(4, topo.num_workers, spw).sum(axis=2).max(axis=1)
    for p2l, tok, limit in ((spread, spread_tokens, busiest), (evened, evened_tokens, spread_busiest)):
        Placement(p2l, experts, spw).validate()
        np.testing.assert_array_equal(expert_counts(p2l, experts), expert_counts(phy2log, experts))
        assert (tok.reshape(4, topo.num_workers, spw).sum(axis=2).max(axis=1) <= limit * (1 + 1e-9)).all()
        np.testing.assert_allclose(np.sort(tok, axis=1), np.sort(tokens, axis=1))  # tokens move with their slots
    assert spans_one_node(spread) <= spans_one_node(phy2log)
    assert spans_one_node(evened) <= spans_one_node(spread)  # swaps inside a node keep the spread
    assert max(exposure(evened, evened_tokens)) <= max(exposure(spread, spread_tokens)) + 1e-6


# ---- plan(..., fault_aware=...) ------------------------------------------------------------------------


def test_nothing_to_do_returns_the_plain_plan_bit_identical():
    load = skewed_load(0, 3, 20)
    topo = Topology(2, 2, 6)
    plain = plan(load, topo)
    idle = FaultAwareOptions(min_surviving_load=0.0, spread_nodes=False, even_exposure=False)
    same = plan(load, topo, fault_aware=idle)
    np.testing.assert_array_equal(same.placement.phy2log, plain.placement.phy2log)
    np.testing.assert_array_equal(same.replica_weights, plain.replica_weights)


@pytest.mark.parametrize("experts,topo", AWKWARD)
@pytest.mark.parametrize("seed", range(5))
def test_fault_aware_plan_survives_single_losses_at_least_as_well(experts, topo, seed):
    load = skewed_load(seed, 4, experts, sigma=(0.6, 1.2)[seed % 2], zeros=seed >= 3)
    plain = plan(load, topo)
    ours = plan(load, topo, fault_aware=FAULT_AWARE)
    check_invariants(ours, load, topo)
    before, after = surviving_load_after_worker_loss(load, plain.placement), surviving_load_after_worker_loss(load, ours.placement)
    assert after.min() >= before.min() - 1e-12 and after.mean() >= before.mean() - 1e-12
    # protected load only grows: every expert the plain plan replicated or protects stays replicated
    assert (load * (ours.placement.logcnt >= 2)).sum() >= (load * (plain.placement.logcnt >= 2)).sum() - 1e-9
    assert ours.predicted_imbalance_LAYERS.mean() <= plain.predicted_imbalance_LAYERS.mean() * 1.02


def test_every_expert_twice_when_the_slots_and_the_balance_budget_allow():
    load = skewed_load(3, 3, 12, sigma=0.3)
    topo = Topology(3, 2, 4)  # 24 slots for 12 experts: exactly two copies each
    ours = plan(load, topo, fault_aware=FaultAwareOptions(max_replica_load=1.0, max_balance_cost=1.0))
    check_invariants(ours, load, topo)
    assert (ours.placement.logcnt == 2).all()
    np.testing.assert_allclose(surviving_after_worker_loss(load, ours.placement), 1.0)
    plain = plan(load, topo)
    assert surviving_after_worker_loss(load, plain.placement).min() < 1.0  # the plain plan gives the hottest 3+
    assert surviving_after_node_loss(load, ours.placement, topo).min() >= surviving_after_node_loss(load, plain.placement, topo).min()


def test_one_redundant_slot_protects_the_hottest_expert_off_its_worker():
    load = np.array([[100.0, 10, 9, 8, 7, 6, 5]])
    topo = Topology.flat(2, 4)  # 8 slots, 7 experts
    ours = plan(load, topo, fault_aware=FAULT_AWARE)
    check_invariants(ours, load, topo)
    assert len(set(workers_of(ours.placement.phy2log[0], 0, 4))) == 2


def test_protected_experts_option_counts_experts():
    load = skewed_load(4, 2, 32, sigma=0.8)
    topo = Topology.flat(4, 10)  # 8 redundant slots
    ours = plan(load, topo, fault_aware=FaultAwareOptions(min_surviving_load=0.0, protected_experts=6))
    hottest = np.argsort(-load, axis=1, kind="stable")[:, :6]
    assert (np.take_along_axis(ours.placement.logcnt, hottest, axis=1) >= 2).all()


def test_hierarchical_plan_keeps_groups_on_their_node():
    load = skewed_load(7, 3, 32)
    topo = Topology(num_nodes=2, workers_per_node=4, slots_per_worker=5)
    ours = plan(load, topo, options=PlannerOptions(hierarchical=True, num_groups=4), fault_aware=FAULT_AWARE)
    check_invariants(ours, load, topo)
    node_of_slot = np.arange(topo.num_slots) // (topo.workers_per_node * topo.slots_per_worker)
    for layer in range(3):
        row = ours.placement.phy2log[layer]
        for group in range(4):
            assert len(set(node_of_slot[(row >= 0) & (row // 8 == group)].tolist())) == 1


def test_replan_keeps_protection_and_moves_little():
    load_a, load_b = skewed_load(10, 4, 48), skewed_load(11, 4, 48)
    topo = Topology(2, 4, 7)  # 56 slots, 8 redundant
    first = plan(load_a, topo, fault_aware=FAULT_AWARE)
    again = plan(load_a, topo, current=first.placement, fault_aware=FAULT_AWARE)
    assert again.migration.num_copies == 0 and again.kept_LAYERS.all()
    drifted = plan(load_b, topo, current=first.placement, fault_aware=FAULT_AWARE)
    check_invariants(drifted, load_b, topo)
    bare = plan(load_b, topo, current=first.placement)  # the same re-plan without the pass
    assert drifted.migration.num_copies <= bare.migration.num_copies + 0.1 * topo.num_slots * 4
    assert (load_b * (drifted.placement.logcnt >= 2)).sum() >= (load_b * (bare.placement.logcnt >= 2)).sum()
    assert surviving_after_worker_loss(load_b, drifted.placement).min() >= surviving_after_worker_loss(load_b, bare.placement).min()
    # the pass's own moves are listed in the migration (kept_LAYERS only where nothing changed)
    unchanged = (drifted.placement.phy2log == first.placement.phy2log).all(axis=1)
    np.testing.assert_array_equal(drifted.kept_LAYERS & ~unchanged, np.zeros(4, dtype=bool))


def test_rejects_out_of_range_options():
    with pytest.raises(ValueError, match="min_surviving_load"):
        FaultAwareOptions(min_surviving_load=1.5)
    with pytest.raises(ValueError, match="max_replica_load"):
        FaultAwareOptions(max_replica_load=0.0)


REAL = real_traces()


@pytest.mark.skipif(not REAL, reason="no traces under ../shared/traces")
@pytest.mark.parametrize("trace", REAL, ids=[t.name for t in REAL])
def test_real_traces_survive_at_least_as_well_at_about_the_same_balance(trace):
    from placement.bench import topology_for

    num_experts = trace.shape[1]
    load = next(iter(trace.workloads.values()))
    for workers in (8, 16, 32):
        if workers > num_experts:
            continue
        topo = topology_for(num_experts, workers, max(1, num_experts // 8))
        plain, ours = plan(load, topo), plan(load, topo, fault_aware=FAULT_AWARE)
        ours.placement.validate()
        before, after = surviving_after_worker_loss(load, plain.placement), surviving_after_worker_loss(load, ours.placement)
        assert after.min() >= before.min() and after.mean() >= before.mean()
        assert ours.predicted_imbalance_LAYERS.mean() <= plain.predicted_imbalance_LAYERS.mean() * 1.01
        if topo.num_nodes > 1:
            assert surviving_after_node_loss(load, ours.placement, topo).min() >= surviving_after_node_loss(load, plain.placement, topo).min()

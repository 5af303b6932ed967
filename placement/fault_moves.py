"""The swap moves of the fault-aware pass (placement/fault_aware.py, its steps 3 and 4): spread a
replicated expert's copies over nodes, and even the single-worker-loss exposure over workers
(fresh plans: permute whole packs; every plan: swap slots between the most and a least exposed
worker of a node). Pure numpy on slot maps; every swap keeps replica counts and never puts two
copies of one expert on one worker.

Legend (docs/placement.md "Shape legend"): L MoE layers, E logical experts, S slots (= W * S_w;
suffix S again inside a worker), W workers, R replicas, local to placement/: A layers still
working in a round. Nodes are spelled out.
"""

from __future__ import annotations

import numpy as np

from placement.layout import Topology, expert_counts, take_rows
from placement.swaps import holds_map

EPS = 1e-9  # relative tolerance of the load comparisons (both modules)
EXPOSURE_SLACK = 1e-3  # step 4 stops once the worst single loss exceeds the mean one by at most this share of the load


def exposed_tokens(phy2log_LS: np.ndarray, tokens_LS: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, S] tokens of the slots whose expert has no other copy (what losing the slot's worker loses)."""
    count_LS = take_rows(expert_counts(phy2log_LS, num_experts), np.maximum(phy2log_LS, 0))
    return np.where((phy2log_LS >= 0) & (count_LS == 1), tokens_LS, 0.0)


def spread_over_nodes(
    phy2log_LS: np.ndarray, tokens_LS: np.ndarray, topology: Topology, num_experts: int, max_swaps: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(phy2log_LS, tokens_LS) after step 3 of the module docstring: per layer per round, the
    hottest replicated expert whose copies all sit on one node swaps one copy with the slot of
    another node of closest tokens, if no worker then holds an expert twice, that slot's expert
    keeps its own spread and no worker ends above the layer's busiest; an expert with no such swap
    stays. `tokens_LS` [L, S] are the slots' tokens; a slot keeps them when it moves."""
    num_layers, num_slots = phy2log_LS.shape
    spw, num_nodes = topology.slots_per_worker, topology.num_nodes
    num_workers = num_slots // spw
    worker_S = np.arange(num_slots) // spw
    node_S = topology.node_of_worker(worker_S)
    rows = np.arange(num_layers)[:, None]
    col_LS = np.where(phy2log_LS >= 0, phy2log_LS, num_experts)  # column E: a free slot, never held or counted
    tokens_LS = np.array(tokens_LS, dtype=np.float64, copy=True)
    holds_LWE = holds_map(np.asarray(phy2log_LS), spw, num_experts)
    on_node = np.zeros((num_layers, num_experts + 1, num_nodes), dtype=np.int64)  # [L, E + 1, nodes] copies
    np.add.at(on_node, (rows, col_LS, node_S[None, :]), 1)
    on_node[:, num_experts] = 0
    expert_load_LE = np.zeros((num_layers, num_experts + 1))
    np.add.at(expert_load_LE, (rows, col_LS), tokens_LS)
    stuck_LE = np.zeros((num_layers, num_experts + 1), dtype=bool)
    limit_L = tokens_LS.reshape(num_layers, num_workers, spw).sum(axis=2).max(axis=1) * (1 + EPS)
    active = np.arange(num_layers)
    for _ in range(max_swaps):
        spans_AE = (on_node[active] > 0).sum(axis=2)
        bad_AE = (on_node[active].sum(axis=2) >= 2) & (spans_AE == 1) & ~stuck_LE[active]
        some_A = bad_AE.any(axis=1)
        active, bad_AE, spans_AE = active[some_A], bad_AE[some_A], spans_AE[some_A]
        if len(active) == 0:
            break
        expert_A = np.argmax(np.where(bad_AE, expert_load_LE[active], -np.inf), axis=1)
        col_AS, slot_tokens_AS = col_LS[active], tokens_LS[active]
        mine_AS = col_AS == expert_A[:, None]
        home_A = node_S[np.argmax(mine_AS, axis=1)]
        # slot b: on another node, its worker without the expert, and its own expert (moving to
        # the home node) still on >= 2 nodes, or on fewer anyway
        cell_AS = (active[:, None] * (num_experts + 1) + col_AS) * num_nodes
        leaves_AS = on_node.reshape(-1).take(cell_AS + node_S[None, :]) == 1
        joins_AS = on_node.reshape(-1).take(cell_AS + home_A[:, None]) == 0
        spans_b_AS = take_rows(spans_AE, col_AS)
        ok_b_AS = (node_S[None, :] != home_A[:, None]) & ~np.repeat(holds_LWE[active, :, expert_A], spw, axis=1)
        ok_b_AS &= (spans_b_AS < 2) | (spans_b_AS - leaves_AS + joins_AS >= 2)
        # slot a: one of the expert's own slots (R of them), its worker without b's expert
        own_AR = np.argsort(~mine_AS, axis=1, kind="stable")[:, : int(mine_AS.sum(axis=1).max())]
        worker_a_AR = own_AR // spw
        legal_ARS = take_rows(mine_AS, own_AR)[:, :, None] & ok_b_AS[:, None, :]
        holds_cell_AR = (active[:, None] * num_workers + worker_a_AR) * (num_experts + 1)
        legal_ARS &= ~holds_LWE.reshape(-1).take(holds_cell_AR[:, :, None] + col_AS[:, None, :])
        load_AW = slot_tokens_AS.reshape(len(active), num_workers, spw).sum(axis=2)
        gain_ARS = slot_tokens_AS[:, None, :] - take_rows(slot_tokens_AS, own_AR)[:, :, None]  # tokens a's worker gains
        new_a_ARS = take_rows(load_AW, worker_a_AR)[:, :, None] + gain_ARS
        legal_ARS &= np.maximum(new_a_ARS, load_AW[:, worker_S][:, None, :] - gain_ARS) <= limit_L[active][:, None, None]
        score_AX = np.where(legal_ARS, np.abs(gain_ARS), np.inf).reshape(len(active), -1)
        best_A = np.argmin(score_AX, axis=1)
        found_A = np.isfinite(score_AX[np.arange(len(active)), best_A])
        stuck_LE[active[~found_A], expert_A[~found_A]] = True
        layers, (rank, slot_b) = active[found_A], np.divmod(best_A[found_A], num_slots)
        slot_a, expert, partner = own_AR[found_A, rank], expert_A[found_A], col_LS[layers, slot_b]
        holds_LWE[layers, worker_S[slot_a], expert] = False
        holds_LWE[layers, worker_S[slot_b], partner] = False
        holds_LWE[layers, worker_S[slot_b], expert] = True
        holds_LWE[layers, worker_S[slot_a], partner] = partner < num_experts
        on_node[layers, expert, node_S[slot_a]] -= 1
        on_node[layers, expert, node_S[slot_b]] += 1
        moved = partner < num_experts
        on_node[layers[moved], partner[moved], node_S[slot_b[moved]]] -= 1
        on_node[layers[moved], partner[moved], node_S[slot_a[moved]]] += 1
        for arr_LS in (col_LS, tokens_LS):
            arr_LS[layers, slot_a], arr_LS[layers, slot_b] = arr_LS[layers, slot_b], arr_LS[layers, slot_a]
    return np.where(col_LS < num_experts, col_LS, -1), tokens_LS


def permute_packs_by_exposure(phy2log_LS: np.ndarray, load_LE: np.ndarray, topology: Topology) -> np.ndarray:
    """[L, S] slot order (new slot s takes old slot order[s]) that moves whole packs between the
    workers of a node so that the exposure summed over layers is even, greedily: layers with the
    most uneven exposure first, each one's most exposed pack to its node's worker least exposed so
    far. Worker loads are only permuted and nodes keep their experts; a moved pack is S_w copies,
    so this is for fresh plans."""
    num_layers, num_slots = phy2log_LS.shape
    spw, num_nodes, per_node = topology.slots_per_worker, topology.num_nodes, topology.workers_per_node
    exposed_LS = exposed_tokens(phy2log_LS, take_rows(load_LE, np.maximum(phy2log_LS, 0)), load_LE.shape[1])
    pack_exposure = exposed_LS.reshape(num_layers, num_nodes, per_node, spw).sum(axis=3)  # [L, nodes, workers of a node]
    slot_order = np.arange(num_slots).reshape(num_nodes, per_node, spw)
    order_LS = np.empty((num_layers, num_nodes, per_node, spw), dtype=np.int64)
    so_far = np.zeros((num_nodes, per_node))  # exposure of each worker over the layers placed so far
    nodes = np.arange(num_nodes)[:, None]
    for layer in np.argsort(-np.ptp(pack_exposure, axis=2).max(axis=1), kind="stable"):
        pack = np.argsort(-pack_exposure[layer], axis=1, kind="stable")  # most exposed first
        worker = np.argsort(so_far, axis=1, kind="stable")  # least exposed so far first
        order_LS[layer][nodes, worker] = slot_order[nodes, pack]
        so_far[nodes, worker] += pack_exposure[layer][nodes, pack]
    return order_LS.reshape(num_layers, num_slots)


def even_exposure_by_swaps(
    phy2log_LS: np.ndarray, tokens_LS: np.ndarray, topology: Topology, num_experts: int, max_swaps: int = 256,
    open_LAYERS: np.ndarray | None = None, start_slack: float = EXPOSURE_SLACK,
) -> tuple[np.ndarray, np.ndarray]:
    """(phy2log_LS, tokens_LS) after swaps that even the exposure summed over layers. Each round the
    most exposed worker swaps with the least exposed worker of its node that has a legal swap (no
    expert twice on a worker, no worker above its layer's busiest, exposure moved in (0, gap)), in
    `open_LAYERS` only (default all): in the layers whose swap moves the most exposure while their
    sum stays within half the gap (at least one layer). Starts only if the worst loss exceeds the
    mean loss by `start_slack` (a share of the load), stops within EXPOSURE_SLACK or after
    `max_swaps` swaps. Swaps stay inside a node, so node spreads stay as they are."""
    col_LS = np.where(phy2log_LS >= 0, phy2log_LS, num_experts)  # column E: a free slot, never held
    tokens_LS = np.array(tokens_LS, dtype=np.float64, copy=True)
    num_layers, num_slots = col_LS.shape
    spw, per_node = topology.slots_per_worker, topology.workers_per_node
    num_workers = num_slots // spw
    single_LE = np.concatenate([expert_counts(phy2log_LS, num_experts) == 1, np.zeros((num_layers, 1), dtype=bool)], axis=1)
    holds_LWE = holds_map(np.asarray(phy2log_LS), spw, num_experts)
    layers = np.arange(num_layers)
    open_L = np.ones(num_layers, dtype=bool) if open_LAYERS is None else np.asarray(open_LAYERS, dtype=bool)
    slack, start = EXPOSURE_SLACK * tokens_LS.sum(), start_slack * tokens_LS.sum()
    swaps = 0
    while swaps < max_swaps and per_node > 1:
        exposed_LS = np.where(take_rows(single_LE, col_LS), tokens_LS, 0.0)
        exposure_W = exposed_LS.reshape(num_layers, num_workers, spw).sum(axis=(0, 2))
        worst = int(np.argmax(exposure_W))
        if exposure_W[worst] - exposure_W.mean() <= (slack if swaps else start):
            break
        peers_I = np.setdiff1d(topology.node_of_worker(worst) * per_node + np.arange(per_node), [worst])
        peers_I = peers_I[np.argsort(exposure_W[peers_I], kind="stable")]  # least exposed first
        gap_I = exposure_W[worst] - exposure_W[peers_I]
        own_S, peer_IS = worst * spw + np.arange(spw), peers_I[:, None] * spw + np.arange(spw)
        load_LW = tokens_LS.reshape(num_layers, num_workers, spw).sum(axis=2)
        limit_L1 = load_LW.max(axis=1)[:, None, None, None] * (1 + EPS)
        # [L, I, own slot, peer slot]: exposure the swap hands the peer, tokens it hands the worst worker
        shift_LISS = exposed_LS[:, own_S][:, None, :, None] - exposed_LS[:, peer_IS][:, :, None, :]
        gain_LISS = tokens_LS[:, peer_IS][:, :, None, :] - tokens_LS[:, own_S][:, None, :, None]
        legal_LISS = (shift_LISS > 0) & (shift_LISS < gap_I[None, :, None, None]) & open_L[:, None, None, None]
        legal_LISS &= (load_LW[:, worst][:, None, None, None] + gain_LISS <= limit_L1)
        legal_LISS &= (load_LW[:, peers_I][:, :, None, None] - gain_LISS <= limit_L1)
        legal_LISS &= ~holds_LWE[layers[:, None, None], peers_I[None, :, None], col_LS[:, own_S][:, None, :]][..., None]
        legal_LISS &= ~holds_LWE[layers[:, None, None], worst, col_LS[:, peer_IS]][:, :, None, :]
        usable_I = legal_LISS.any(axis=(0, 2, 3))
        if not usable_I.any():
            break
        first = int(np.argmax(usable_I))  # the least exposed peer with a legal swap
        partner, gap = int(peers_I[first]), gap_I[first]
        score_LX = np.where(legal_LISS[:, first], np.abs(shift_LISS[:, first] - gap / 2), np.inf).reshape(num_layers, -1)
        best_L = np.argmin(score_LX, axis=1)
        found_X = np.flatnonzero(np.isfinite(score_LX[layers, best_L]))
        own_X, peer_X = np.divmod(best_L[found_X], spw)
        shift_X = shift_LISS[found_X, first, own_X, peer_X]
        order_X = np.argsort(-shift_X, kind="stable")
        take_X = order_X[np.cumsum(shift_X[order_X]) <= gap / 2]
        take_X = take_X if len(take_X) else np.argmin(score_LX[found_X, best_L[found_X]])[None]
        swap_layers, slot_a, slot_b = found_X[take_X], own_S[own_X[take_X]], partner * spw + peer_X[take_X]
        col_a, col_b = col_LS[swap_layers, slot_a], col_LS[swap_layers, slot_b]
        holds_LWE[swap_layers, worst, col_a] = holds_LWE[swap_layers, partner, col_b] = False
        holds_LWE[swap_layers, partner, col_a] = col_a < num_experts
        holds_LWE[swap_layers, worst, col_b] = col_b < num_experts
        for arr_LS in (col_LS, tokens_LS):
            arr_LS[swap_layers, slot_a], arr_LS[swap_layers, slot_b] = arr_LS[swap_layers, slot_b], arr_LS[swap_layers, slot_a]
        swaps += len(take_X)
    return np.where(col_LS < num_experts, col_LS, -1), tokens_LS

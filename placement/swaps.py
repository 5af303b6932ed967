"""Swap local search on slot maps, vectorised over layers (and over worker pairs).

Legend (docs/placement.md "Shape legend"): L MoE layers, E logical experts, S slots (= W * S_w;
suffix S inside a worker), W workers, X (layer, worker pair) rows evaluated together; local to
placement/: A layers still searching, I candidate partner workers of one busy worker, O busy
workers of one round (one swap each, disjoint partners); a trailing SS is the flat (slot, slot)
choice i * S_w + j of one swap.

A swap exchanges one slot of worker a with one slot of worker b; it is legal when neither
worker ends up with two copies of one expert. Free slots are items of weight 0 (expert -1), so a
swap with one is a plain move. Items keep their tokens when they move (a slot's tokens are its
share of its expert's load).

`balance_pairs`    fresh plans (bytes do not matter): every round pairs the i-th heaviest worker
                   with the i-th lightest and applies each pair's best balancing swap at once, so
                   a round fixes W / 2 pairs for the cost of one numpy pass.
`refine_by_swaps`  migration-aware (every swap is 2 copies): one swap per layer per round, on the
                   busiest worker, with the best of its I lightest peers (or, with `parallel`,
                   one swap on each of the O busiest workers, with disjoint partners).
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-9


def holds_map(phy2log_LS: np.ndarray, slots_per_worker: int, num_experts: int) -> np.ndarray:
    """[L, W, E + 1] bool: worker w holds expert e; column E (free slot) is never held."""
    num_layers, num_slots = phy2log_LS.shape
    num_workers = num_slots // slots_per_worker
    holds_LWE = np.zeros((num_layers, num_workers, num_experts + 1), dtype=bool)
    # one flat index per held slot: (layer * W + worker) * (E + 1) + expert
    cell_LS = (np.arange(num_layers)[:, None] * num_workers + np.arange(num_slots) // slots_per_worker) * (num_experts + 1)
    flat_LS = cell_LS + phy2log_LS
    holds_LWE.reshape(-1)[flat_LS[phy2log_LS >= 0]] = True
    return holds_LWE


def best_pair_swaps(holds_LWE, layer_X, worker_a_X, worker_b_X, load_a_X, load_b_X, col_a_XS, weight_a_XS, col_b_XS, weight_b_XS, want_best=True):
    """(best_X, score_XSS): for each pair (layer, a, b) the flat index i * S_w + j of the legal swap of
    a's slot i with b's slot j that leaves the pair closest to even, by score |delta - gap / 2|
    (delta = tokens a gives b, gap = load a - load b; inf when illegal). The swap lowers the pair
    maximum iff score < gap / 2. `col_*` are expert ids with free slots as E. best_X is None
    unless `want_best`."""
    num_x, S_w = col_a_XS.shape
    _, W, E1 = holds_LWE.shape
    flat_holds = holds_LWE.reshape(-1)  # a view: one 1-D take is ~3x faster than 3 index arrays
    a_on_b_XS = flat_holds.take(((layer_X * W + worker_b_X) * E1)[:, None] + col_a_XS)
    b_on_a_XS = flat_holds.take(((layer_X * W + worker_a_X) * E1)[:, None] + col_b_XS)
    give_XS = np.where(a_on_b_XS, np.inf, weight_a_XS)
    take_XS = np.where(b_on_a_XS, -np.inf, weight_b_XS + ((load_a_X - load_b_X) / 2)[:, None])
    score_XSS = np.abs(give_XS[:, :, None] - take_XS[:, None, :]).reshape(num_x, S_w * S_w)
    return (np.argmin(score_XSS, axis=1) if want_best else None), score_XSS


def pair_swap_maxima(holds_LWE, layer_X, worker_a_X, worker_b_X, load_a_X, load_b_X, col_a_XS, weight_a_XS, col_b_XS, weight_b_XS, out_XSS):
    """[X, S_w * S_w] (a view of `out_XSS`): the larger of the two loads of pair (layer, a, b) after
    swapping a's slot i with b's slot j, at i * S_w + j; inf when illegal. Same as
    (load_a + load_b) / 2 + the score of `best_pair_swaps`, computed in place in a buffer the
    caller reuses across rounds (fresh [X, S_w, S_w] temporaries cost ~3x the arithmetic)."""
    num_x, S_w = col_a_XS.shape
    _, W, E1 = holds_LWE.shape
    flat_holds = holds_LWE.reshape(-1)
    a_on_b_XS = flat_holds.take(((layer_X * W + worker_b_X) * E1)[:, None] + col_a_XS)
    b_on_a_XS = flat_holds.take(((layer_X * W + worker_a_X) * E1)[:, None] + col_b_XS)
    give_XS = np.where(a_on_b_XS, np.inf, weight_a_XS)
    take_XS = np.where(b_on_a_XS, -np.inf, weight_b_XS + ((load_a_X - load_b_X) / 2)[:, None])
    out = out_XSS[:num_x]
    np.subtract(give_XS[:, :, None], take_XS[:, None, :], out=out)
    np.abs(out, out=out)
    np.add(out, ((load_a_X + load_b_X) / 2)[:, None, None], out=out)
    return out.reshape(num_x, S_w * S_w)


def swap_copy_cost(col_a_XS, origin_a_XS, col_b_XS, origin_b_XS, free_col):
    """[X, S_w * S_w] int: change in slot copies (against the origin map) of swapping a's slot i
    with b's slot j, at i * S_w + j (-2 .. 2). A slot costs a copy when it holds an expert that
    is not its origin's; a free slot (`free_col`) costs nothing."""
    num_x, S_w = col_a_XS.shape
    now_a_XS = (col_a_XS != origin_a_XS) & (col_a_XS != free_col)
    now_b_XS = (col_b_XS != origin_b_XS) & (col_b_XS != free_col)
    # after the swap slot a_i holds b_j and slot b_j holds a_i
    a_gets_XSS = (col_b_XS[:, None, :] != origin_a_XS[:, :, None]) & (col_b_XS[:, None, :] != free_col)
    b_gets_XSS = (col_a_XS[:, :, None] != origin_b_XS[:, None, :]) & (col_a_XS[:, :, None] != free_col)
    cost_XSS = a_gets_XSS.astype(np.int64) + b_gets_XSS - now_a_XS[:, :, None] - now_b_XS[:, None, :]
    return cost_XSS.reshape(num_x, S_w * S_w)


def _apply(phy2log_LS, slot_weight_LS, worker_load_LW, holds_LWE, num_experts, layers, slot_a, slot_b, worker_a, worker_b):
    """Swap slot_a <-> slot_b in the given layers (in place; pairs must be disjoint per layer)."""
    expert_a, expert_b = phy2log_LS[layers, slot_a], phy2log_LS[layers, slot_b]
    weight_a, weight_b = slot_weight_LS[layers, slot_a], slot_weight_LS[layers, slot_b]
    phy2log_LS[layers, slot_a], phy2log_LS[layers, slot_b] = expert_b, expert_a
    slot_weight_LS[layers, slot_a], slot_weight_LS[layers, slot_b] = weight_b, weight_a
    worker_load_LW[layers, worker_a] += weight_b - weight_a
    worker_load_LW[layers, worker_b] += weight_a - weight_b
    col_a = np.where(expert_a >= 0, expert_a, num_experts)
    col_b = np.where(expert_b >= 0, expert_b, num_experts)
    holds_LWE[layers, worker_a, col_a] = False
    holds_LWE[layers, worker_b, col_b] = False
    holds_LWE[layers, worker_a, col_b] = expert_b >= 0
    holds_LWE[layers, worker_b, col_a] = expert_a >= 0


def _gather(arr_LS, layer_X, worker_X, S_w):
    """[X, S_w] values of the S_w slots of worker_X in layer_X."""
    return arr_LS.reshape(arr_LS.shape[0], -1, S_w)[layer_X, worker_X]


def balance_pairs(
    phy2log_LS: np.ndarray,
    slot_weight_LS: np.ndarray,
    slots_per_worker: int,
    num_experts: int,
    target_LAYERS: np.ndarray,
    rounds: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Rounds of parallel pair balancing; returns (phy2log_LS, slot_weight_LS) copies.

    Round: sort each layer's workers by load; pair the i-th heaviest with the i-th lightest
    (i < W / 2); in every pair apply the legal swap that leaves the pair closest to even when it
    lowers the pair's maximum. The busiest worker never gets busier, so the layer maximum never
    rises. A layer stops once its busiest worker is at or below `target_LAYERS` (tokens) or
    when no pair improves.
    """
    phy2log_LS = phy2log_LS.copy()
    slot_weight_LS = np.asarray(slot_weight_LS, dtype=np.float64).copy()
    num_layers, num_slots = phy2log_LS.shape
    S_w = slots_per_worker
    W = num_slots // S_w
    O = W // 2
    if O < 1:
        return phy2log_LS, slot_weight_LS
    holds_LWE = holds_map(phy2log_LS, S_w, num_experts)
    col_LS = np.where(phy2log_LS >= 0, phy2log_LS, num_experts)
    worker_load_LW = slot_weight_LS.reshape(num_layers, W, S_w).sum(axis=2)
    active = np.arange(num_layers)
    for _ in range(rounds):
        active = active[worker_load_LW[active].max(axis=1) > target_LAYERS[active] * (1 + _EPS)]
        if len(active) == 0:
            break
        order_AW = np.argsort(worker_load_LW[active], axis=1)
        heavy_X, light_X = order_AW[:, ::-1][:, :O].ravel(), order_AW[:, :O].ravel()
        layer_X = np.repeat(active, O)
        load_a_X, load_b_X = worker_load_LW[layer_X, heavy_X], worker_load_LW[layer_X, light_X]
        best_X, score_XSS = best_pair_swaps(
            holds_LWE, layer_X, heavy_X, light_X, load_a_X, load_b_X,
            _gather(col_LS, layer_X, heavy_X, S_w), _gather(slot_weight_LS, layer_X, heavy_X, S_w),
            _gather(col_LS, layer_X, light_X, S_w), _gather(slot_weight_LS, layer_X, light_X, S_w),
        )
        gap_X = (load_a_X - load_b_X) / 2
        sel = np.nonzero(score_XSS[np.arange(len(best_X)), best_X] < gap_X * (1 - 1e-6))[0]
        if len(sel) == 0:
            break
        ca, cb = np.divmod(best_X[sel], S_w)
        layers, worker_a, worker_b = layer_X[sel], heavy_X[sel], light_X[sel]
        slot_a, slot_b = worker_a * S_w + ca, worker_b * S_w + cb
        _apply(phy2log_LS, slot_weight_LS, worker_load_LW, holds_LWE, num_experts, layers, slot_a, slot_b, worker_a, worker_b)
        col_LS[layers, slot_a], col_LS[layers, slot_b] = col_LS[layers, slot_b], col_LS[layers, slot_a]
        active = np.unique(layers)
    return phy2log_LS, slot_weight_LS


def refine_by_swaps(
    phy2log_LS: np.ndarray,
    slot_weight_LS: np.ndarray,
    slots_per_worker: int,
    num_experts: int,
    target_LAYERS: np.ndarray | None = None,
    max_swaps: int = 200,
    num_partners: int = 8,
    active_LAYERS: np.ndarray | None = None,
    parallel: int = 1,
    holds_LWE: np.ndarray | None = None,
    origin_LS: np.ndarray | None = None,
    copy_penalty_LAYERS: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local search on the busiest worker of each layer; returns (phy2log_LS, slot_weight_LS, swaps_L).

    Each round swaps one slot of the busiest worker `a` with one slot of one of the
    `num_partners` lightest workers `b`, choosing the swap with the smallest max(new a, new b)
    that is below a's load and breaks no invariant (no expert twice on one worker). A layer
    stops when its busiest worker is at or below `target_LAYERS` (tokens; default 0 = keep going
    while it improves), when no swap improves, or after `max_swaps` rounds.

    `parallel` > 1: each round also works on the next busiest workers, up to `parallel` per layer
    (only those above the target): busy worker i (i-th busiest) gets the lightest workers of rank
    i, i + O, i + 2 O, ... as its I partners, so the pairs are disjoint and all their best swaps
    apply at once. O = min(parallel, W // (I + 1)).

    `holds_LWE`: the caller's `holds_map` of `phy2log_LS` if it has one (taken over and updated).

    `origin_LS` with `copy_penalty_LAYERS` ([L] tokens per slot copy): among the swaps that lower
    the busy worker, choose the one with the smallest pair max + penalty x its change in copies
    against `origin_LS` (`swap_copy_cost`), so swaps that move slots back (or move already
    moved slots again) win over fresh copies of nearly the same balance.
    """
    phy2log_LS = phy2log_LS.copy()
    slot_weight_LS = np.asarray(slot_weight_LS, dtype=np.float64).copy()
    num_layers, num_slots = phy2log_LS.shape
    S_w = slots_per_worker
    W = num_slots // S_w
    I = min(num_partners, W - 1)
    swaps_L = np.zeros(num_layers, dtype=np.int64)
    if I < 1 or num_layers == 0:
        return phy2log_LS, slot_weight_LS, swaps_L
    target_L = np.zeros(num_layers) if target_LAYERS is None else np.asarray(target_LAYERS, dtype=np.float64)
    holds_LWE = holds_map(phy2log_LS, S_w, num_experts) if holds_LWE is None else holds_LWE
    col_LS = np.where(phy2log_LS >= 0, phy2log_LS, num_experts)
    worker_load_LW = slot_weight_LS.reshape(num_layers, W, S_w).sum(axis=2)
    active = np.arange(num_layers) if active_LAYERS is None else np.nonzero(active_LAYERS)[0]
    O = max(1, min(parallel, W // (I + 1)))
    buffer_XSS = np.empty((len(active) * O * I, S_w, S_w))  # the largest round's swap scores, reused
    penalty = None
    if origin_LS is not None and copy_penalty_LAYERS is not None:
        origin_col_LS = np.where(origin_LS >= 0, origin_LS, num_experts)
        penalty = (origin_col_LS, np.asarray(copy_penalty_LAYERS, dtype=np.float64))
    if O > 1:
        _parallel_rounds(phy2log_LS, slot_weight_LS, worker_load_LW, holds_LWE, col_LS, swaps_L, num_experts, S_w, I, O, target_L, active, max_swaps, buffer_XSS, penalty)
        return phy2log_LS, slot_weight_LS, swaps_L
    for _ in range(max_swaps):
        if len(active) == 0:
            break
        load_AW = worker_load_LW[active]
        busiest_A = np.argmax(load_AW, axis=1)
        busiest_load_A = load_AW[np.arange(len(active)), busiest_A]
        keep = busiest_load_A > target_L[active] * (1 + _EPS)
        if not keep.all():
            active, load_AW, busiest_A, busiest_load_A = active[keep], load_AW[keep], busiest_A[keep], busiest_load_A[keep]
            if len(active) == 0:
                break
        ar = np.arange(len(active))
        load_AW[ar, busiest_A] = np.inf  # never partner with itself
        if I < W - 1:
            partners_AI = np.argpartition(load_AW, I - 1, axis=1)[:, :I]
        else:
            partners_AI = np.argsort(load_AW, axis=1)[:, :I]
        layer_X, heavy_X, light_X = np.repeat(active, I), np.repeat(busiest_A, I), partners_AI.ravel()
        load_a_X, load_b_X = np.repeat(busiest_load_A, I), load_AW[ar[:, None], partners_AI].ravel()
        new_max_AISS = pair_swap_maxima(
            holds_LWE, layer_X, heavy_X, light_X, load_a_X, load_b_X,
            np.repeat(_gather(col_LS, active, busiest_A, S_w), I, axis=0),
            np.repeat(_gather(slot_weight_LS, active, busiest_A, S_w), I, axis=0),
            _gather(col_LS, layer_X, light_X, S_w), _gather(slot_weight_LS, layer_X, light_X, S_w), buffer_XSS,
        ).reshape(len(active), I * S_w * S_w)  # compare across partners
        if penalty is None:
            best_A = np.argmin(new_max_AISS, axis=1)
        else:
            origin_col_LS, penalty_L = penalty
            cost_AISS = swap_copy_cost(
                np.repeat(_gather(col_LS, active, busiest_A, S_w), I, axis=0), np.repeat(_gather(origin_col_LS, active, busiest_A, S_w), I, axis=0),
                _gather(col_LS, layer_X, light_X, S_w), _gather(origin_col_LS, layer_X, light_X, S_w), num_experts,
            ).reshape(len(active), I * S_w * S_w)
            score_AISS = np.where(new_max_AISS < busiest_load_A[:, None] * (1 - _EPS), new_max_AISS + penalty_L[active][:, None] * cost_AISS, np.inf)
            best_A = np.argmin(score_AISS, axis=1)
        sel = np.nonzero(new_max_AISS[ar, best_A] < busiest_load_A * (1 - _EPS))[0]
        if len(sel) == 0:
            break
        best_k, best_q = np.divmod(best_A[sel], S_w * S_w)
        ca, cb = np.divmod(best_q, S_w)
        layers, worker_a, worker_b = active[sel], busiest_A[sel], partners_AI[sel, best_k]
        slot_a, slot_b = worker_a * S_w + ca, worker_b * S_w + cb
        _apply(phy2log_LS, slot_weight_LS, worker_load_LW, holds_LWE, num_experts, layers, slot_a, slot_b, worker_a, worker_b)
        col_LS[layers, slot_a], col_LS[layers, slot_b] = col_LS[layers, slot_b], col_LS[layers, slot_a]
        swaps_L[layers] += 1
        active = layers
    return phy2log_LS, slot_weight_LS, swaps_L


def _parallel_rounds(phy2log_LS, slot_weight_LS, worker_load_LW, holds_LWE, col_LS, swaps_L, num_experts, S_w, I, O, target_L, active, rounds, buffer_XSS, penalty=None):
    """`refine_by_swaps` with the O busiest workers of each layer searching at once (in place).

    A busy worker's partners are tried lightest first, in blocks (`_PARTNER_BLOCKS`): after the
    pair max with partner k is known never to go below (load a + load b_k) / 2, a row whose best
    swap so far is already at or below that bound for the next partner (and so for all later,
    heavier ones) stops. The choice is the one the full search over all I partners makes (ties
    to the earliest partner, then the lowest slot pair); the lightest partner alone settles
    ~92% of the rows on DeepSeek drift, so most rows cost one partner instead of I.
    With a copy `penalty` (origin columns, [L] tokens per copy) rows compare pair max + penalty x
    change in copies; a later partner's score is >= its floor - 2 x penalty, so the same early stop
    holds with that lower floor.
    """
    for _ in range(rounds):
        if len(active) == 0:
            break
        active = active[worker_load_LW[active].max(axis=1) > target_L[active] * (1 + _EPS)]
        if len(active) == 0:
            break
        load_AW = worker_load_LW[active]
        order_AW = np.argsort(load_AW, axis=1)
        busy_AO = order_AW[:, ::-1][:, :O]
        partners_AOI = order_AW[:, : O * I].reshape(len(active), I, O).transpose(0, 2, 1)  # lightest first
        ar = np.arange(len(active))[:, None]
        busy_load_AO = load_AW[ar, busy_AO]
        # rows: busy workers above the target (the others never swap)
        rows_O = np.flatnonzero(busy_load_AO.ravel() > np.repeat(target_L[active], O) * (1 + _EPS))
        layer_O = np.repeat(active, O)[rows_O]
        busy_O, busy_load_O = busy_AO.ravel()[rows_O], busy_load_AO.ravel()[rows_O]
        partners_OI = partners_AOI.reshape(-1, I)[rows_O]
        partner_load_OI = load_AW[np.repeat(np.arange(len(active)), O)[rows_O][:, None], partners_OI]
        floor_OI = (busy_load_O[:, None] + partner_load_OI) / 2  # pair max never below this (as computed below)
        busy_col_OS, busy_weight_OS = _gather(col_LS, layer_O, busy_O, S_w), _gather(slot_weight_LS, layer_O, busy_O, S_w)
        best_max_O = np.full(len(rows_O), np.inf)
        best_score_O = best_max_O.copy()  # the max itself without a penalty
        slack_O = 0.0 if penalty is None else 2 * penalty[1][layer_O]  # a swap's penalty is >= -2 copies
        best_k_O = np.zeros(len(rows_O), dtype=np.int64)
        best_q_O = np.zeros(len(rows_O), dtype=np.int64)
        todo = np.arange(len(rows_O))
        for k0, k1 in _partner_blocks(I):
            n = k1 - k0
            layer_X = np.repeat(layer_O[todo], n)
            heavy_X, light_X = np.repeat(busy_O[todo], n), partners_OI[todo, k0:k1].ravel()
            todo_max_OISS = pair_swap_maxima(
                holds_LWE, layer_X, heavy_X, light_X, np.repeat(busy_load_O[todo], n), partner_load_OI[todo, k0:k1].ravel(),
                np.repeat(busy_col_OS[todo], n, axis=0), np.repeat(busy_weight_OS[todo], n, axis=0),
                _gather(col_LS, layer_X, light_X, S_w), _gather(slot_weight_LS, layer_X, light_X, S_w), buffer_XSS,
            ).reshape(len(todo), n * S_w * S_w)
            if penalty is not None:
                origin_col_LS, penalty_L = penalty
                cost_OISS = swap_copy_cost(
                    np.repeat(busy_col_OS[todo], n, axis=0), np.repeat(_gather(origin_col_LS, layer_O[todo], busy_O[todo], S_w), n, axis=0),
                    _gather(col_LS, layer_X, light_X, S_w), _gather(origin_col_LS, layer_X, light_X, S_w), num_experts,
                ).reshape(len(todo), n * S_w * S_w)
                score_OISS = np.where(todo_max_OISS < busy_load_O[todo][:, None] * (1 - _EPS),
                                      todo_max_OISS + penalty_L[layer_O[todo]][:, None] * cost_OISS, np.inf)
                todo_arg_O = np.argmin(score_OISS, axis=1)
                todo_score_O = score_OISS[np.arange(len(todo)), todo_arg_O]
            else:
                todo_arg_O = np.argmin(todo_max_OISS, axis=1)
            todo_max_O = todo_max_OISS[np.arange(len(todo)), todo_arg_O]
            if penalty is None:
                todo_score_O = todo_max_O
            better = todo_score_O < best_score_O[todo]  # strict: an earlier (lighter) partner wins ties
            won = todo[better]
            best_max_O[won], best_score_O[won] = todo_max_O[better], todo_score_O[better]
            best_k_O[won], best_q_O[won] = np.divmod(todo_arg_O[better], S_w * S_w)
            best_k_O[won] += k0
            if k1 < I:
                todo = todo[best_score_O[todo] > floor_OI[todo, k1] - (slack_O if penalty is None else slack_O[todo])]
            if len(todo) == 0:
                break
        sel = np.flatnonzero(best_max_O < busy_load_O * (1 - _EPS))
        if len(sel) == 0:
            break
        best_k, best_q = best_k_O[sel], best_q_O[sel]
        ca, cb = np.divmod(best_q, S_w)
        layers, worker_a = layer_O[sel], busy_O[sel]
        worker_b = partners_OI[sel, best_k]
        slot_a, slot_b = worker_a * S_w + ca, worker_b * S_w + cb
        _apply(phy2log_LS, slot_weight_LS, worker_load_LW, holds_LWE, num_experts, layers, slot_a, slot_b, worker_a, worker_b)
        col_LS[layers, slot_a], col_LS[layers, slot_b] = col_LS[layers, slot_b], col_LS[layers, slot_a]
        swaps_L += np.bincount(layers, minlength=len(swaps_L))
        active = np.unique(layers)


_PARTNER_BLOCKS = (1, 1)  # partners of the first blocks; the rest form the last block


def _partner_blocks(num_partners: int):
    """[(k0, k1)] consecutive partner ranges: the _PARTNER_BLOCKS sizes, then all the others."""
    blocks, k0 = [], 0
    for size in _PARTNER_BLOCKS:
        if k0 >= num_partners:
            break
        blocks.append((k0, min(k0 + size, num_partners)))
        k0 = blocks[-1][1]
    if k0 < num_partners:
        blocks.append((k0, num_partners))
    return blocks

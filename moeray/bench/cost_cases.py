"""The cases of `moeray bench cost` (moeray/bench/cost.py) and their predictions: calibration
grids, held-out kernel launches, layer steps routed on real layouts, host-work calibration steps.
No timing here (moeray/bench/cost_measure.py times them).

Legend (docs/architecture.md): T tokens (per rank in the layer part), K top-k, E experts, F expert
FFN width, S slots (S_w per worker), W workers (ranks), X any number of rows.
"""

from __future__ import annotations

import numpy as np

TRACE_LAYERS = (0, 7, 15)  # the OLMoE trace's layers (placement.traces)
UNEVEN_WIDTHS = (1.0, 1 / 2, 1 / 3, 3 / 4, 1 / 4, 2 / 3)
HOST_TOKENS = (48, 96, 192, 384)  # host calibration: tokens per rank (x K entries), uniform routing


def kernel_plan(device: str, quick: bool) -> dict:
    """Slots per launch; calibration grid (whole experts: rows x touched; sharded: rows x touched x
    width); held-out uniform (rows, touched) and sharded (rows, touched, width), none of them on the
    grid; batch sizes of the trace cases."""
    if device == "cuda":
        plan = {"slots": 64, "rows": (1, 8, 32, 128, 512, 2048), "touched": (1, 8, 32, 64),
                "sharded": ((32, 2048), (8, 64), (1 / 2, 1 / 4)),
                "uniform": ((16, 16), (64, 48), (256, 24), (1024, 8), (4, 64)), "tokens": (16, 128, 1024, 8192),
                "sharded_uniform": ((128, 64, 1 / 2), (512, 32, 1 / 4))}
        if quick:
            plan.update(rows=(1, 32, 512), touched=(1, 16, 64), sharded=((32,), (64,), (1 / 2,)), uniform=((64, 48),),
                        tokens=(128, 1024), sharded_uniform=((128, 64, 1 / 2),))
        return plan
    plan = {"slots": 32, "rows": (1, 4, 16, 64, 256), "touched": (1, 4, 16, 32),
            "sharded": ((4, 64, 256), (4, 32), (1 / 2, 1 / 4)),
            "uniform": ((8, 8), (32, 24), (128, 12), (2, 32)), "tokens": (64, 256, 1024),
            "sharded_uniform": ((64, 16, 1 / 2), (256, 8, 1 / 4))}
    if quick:
        plan.update(slots=8, rows=(1, 8, 64), touched=(1, 8), sharded=((8, 64), (8,), (1 / 2,)), uniform=((16, 4),),
                    tokens=(64,), sharded_uniform=((32, 8, 1 / 2),))
    return plan


def exchange_sizes(quick: bool) -> list[int]:
    """Bytes per rank: 4 KiB .. 16 MiB in steps of 2 (quick: 4 KiB .. 1 MiB in steps of 4)."""
    if quick:
        return [4096 << (2 * i) for i in range(5)]
    return [4096 << i for i in range(13)]


def columns(width: float, ffn: int) -> int:
    return max(1, min(ffn, int(round(width * ffn))))


def trace_batch_counts(load_E: np.ndarray, num_tokens: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """[E] rows per expert of one batch of `num_tokens` tokens drawn from the layer's load."""
    from placement.traces import sample_batch_ids

    ids_TK = sample_batch_ids(load_E, num_tokens, top_k, rng)
    return np.bincount(ids_TK.ravel(), minlength=len(load_E))


def kernel_cases(plan: dict, load_LE: np.ndarray | None, ffn: int, top_k: int, seed: int):
    """(calibration, held_out): lists of (name, rows_S, columns_S) for one launch of `plan['slots']` slots."""
    S = plan["slots"]
    full = [ffn] * S

    def uniform(rows: int, touched: int, width: float = 1.0):
        return [rows] * touched + [0] * (S - touched), [columns(width, ffn)] * S

    calibration = [(f"grid r={r} t={t}", *uniform(r, t)) for r in plan["rows"] for t in plan["touched"] if t <= S]
    rows_grid, touched_grid, widths = plan["sharded"]
    calibration += [(f"grid r={r} t={t} w={w:.2f}", *uniform(r, t, w))
                    for r in rows_grid for t in touched_grid for w in widths if t <= S]
    held = [(f"uniform r={r} t={t}", *uniform(r, min(t, S))) for r, t in plan["uniform"]]
    held += [(f"uniform r={r} t={min(t, S)} w={w:.2f}", *uniform(r, min(t, S), w)) for r, t, w in plan["sharded_uniform"]]
    if load_LE is not None:
        rng = np.random.default_rng(seed)
        for layer_index, layer in enumerate(TRACE_LAYERS[: len(load_LE)]):
            for tokens in plan["tokens"]:
                rows = trace_batch_counts(load_LE[layer_index], tokens, top_k, rng)[:S].tolist()
                held.append((f"trace L{layer} T={tokens}", rows, full))
                if layer == 7 or len(load_LE) == 1:
                    for label, ws in (("1/2", [1 / 2] * S), ("1/3", [1 / 3] * S),
                                      ("uneven", [UNEVEN_WIDTHS[s % len(UNEVEN_WIDTHS)] for s in range(S)])):
                        held.append((f"trace L{layer} T={tokens} w={label}", rows, [columns(w, ffn) for w in ws]))
    return calibration, held


def slot_case(row: dict, hidden: int, ffn: int, weight_bytes: float):
    from placement.cost_fit import SlotCase

    return SlotCase(row["name"], tuple(row["rows_S"]), tuple(row["width_S"]), hidden, ffn, row["measured_s"], weight_bytes)


def size_label(nbytes: float) -> str:
    nbytes = int(nbytes)
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def exchange_errors(rows: list[tuple[float, float]], label: str, num_ranks: int = 2) -> tuple[object, list[dict]]:
    """Fit link rates on every other (bytes, seconds) row, the first one fitted; every row with its
    prediction and whether it was fitted."""
    from placement.cost_fit import fit_link_rates_to, predict_exchange_ranks

    rates = fit_link_rates_to(rows[0::2], num_ranks, source=f"fit_link_rates_to: every other size of {label}")
    table = [{"name": f"{label} {size_label(b)}", "bytes": int(b), "measured_s": t,
              "predicted_s": predict_exchange_ranks(b, rates, num_ranks), "fitted": i % 2 == 0}
             for i, (b, t) in enumerate(rows)]
    return rates, table


def layouts_for(load_E: np.ndarray, num_workers: int, spare: int) -> dict:
    """{name: (phy2log_S, width_S, weights_S, slots_per_worker)} on the real workers."""
    from placement import Placement, Topology
    from placement.sharding import group_layout, materialize, replicate_layout, shard_replicas_layout

    E = len(load_E)
    S_w = E // num_workers + spare
    topology = Topology.flat(num_workers, S_w)
    load_LE = np.asarray(load_E, dtype=np.float64)[None]
    static = Placement.contiguous(1, E, num_workers, S_w).phy2log
    out = {"static": (static[0], (static[0] >= 0).astype(np.float64), (static[0] >= 0).astype(np.float64), S_w)}
    replicate = replicate_layout(load_LE, topology)
    for layout in (replicate, shard_replicas_layout(replicate, E), group_layout(load_LE, topology, 2)):
        phy2log, width, weights, spw = materialize(layout, num_workers)
        out[layout.name] = (np.asarray(phy2log[0]), np.asarray(width[0], dtype=np.float64), np.asarray(weights[0]), spw)
    return out


def route_layer_case(ids_TK: np.ndarray, layout, num_workers: int, tokens_per_rank: int, num_experts: int, ffn: int) -> dict:
    """Rows per slot and each rank's entries of one batch on one layout: the slot rows of the batch
    (placement.batch_split.split_batch + pairs_to_slots), each fanned-out (pair, slot) entry one row."""
    from placement.batch_split import ReplicaUnits, pairs_to_slots, split_batch

    phy2log_S, width_S, weights_S, spw = layout
    top_k = ids_TK.shape[1]
    units = ReplicaUnits(phy2log_S[None], spw, num_experts, width_S[None])
    counts_E = np.bincount(ids_TK.ravel(), minlength=num_experts)
    rows_S = split_batch(units, counts_E[None, None], weights_S[None])[0, 0]
    pair_X, slot_X = pairs_to_slots(ids_TK, phy2log_S, units.replica_LS[0], rows_S, num_experts)
    token_X = pair_X // top_k
    rank_X = token_X // tokens_per_rank
    columns_S = np.array([columns(w, ffn) if p >= 0 else ffn for p, w in zip(phy2log_S, width_S)], dtype=np.int64)
    entries = [(token_X[rank_X == r] - r * tokens_per_rank, slot_X[rank_X == r]) for r in range(num_workers)]
    return {"rows_S": rows_S, "width_S": np.where(phy2log_S >= 0, columns_S / ffn, 0.0), "spw": spw,
            "columns_WS": columns_S.reshape(num_workers, spw), "entries": entries}


def host_cases(num_workers: int, num_experts: int, top_k: int, spare: int, ffn: int, seed: int, quick: bool) -> list:
    """Layer steps of uniform routing (each token K distinct experts) on the static layout of
    `num_workers` ranks, HOST_TOKENS tokens per rank: the calibration of the host work on those ranks."""
    rng = np.random.default_rng(seed)
    static = layouts_for(np.ones(num_experts), num_workers, spare)["static"]
    out = []
    for tokens in HOST_TOKENS[1::2] if quick else HOST_TOKENS:
        ids_TK = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(num_workers * tokens)])
        case = route_layer_case(ids_TK, static, num_workers, tokens, num_experts, ffn)
        out.append((f"W={num_workers} host T={tokens}", {**case, "tokens": tokens}))
    return out


def predict_layer_case(case: dict, model, num_workers: int, tokens: int) -> dict:
    """The model's layer phases (StepCostModel.layer_phases) for one routed case, and the bare
    layer_seconds (max compute + 2 x max exchange, every worker its own cores) with the same rates."""
    from placement.layout import Topology

    rows_S, spw = case["rows_S"], case["spw"]
    phases = model.layer_phases(rows_S[None].astype(np.float64), case["width_S"][None], spw, tokens,
                                Topology.flat(num_workers, spw))
    pairs_XW = rows_S.reshape(1, num_workers, spw).sum(axis=2).astype(np.float64)
    bare = model.layer_seconds(model.compute_seconds(rows_S[None].astype(np.float64), case["width_S"][None], spw),
                               model.exchange_seconds(pairs_XW, tokens, Topology.flat(num_workers, spw)))
    return {"predicted_s": float(phases["total"][0]), "predicted_compute_s": float(phases["compute"][0]),
            "predicted_exchange_s": float(phases["exchange"][0]), "predicted_host_s": float(phases["host"][0]),
            "predicted_bare_s": float(bare[0]), "rows_per_worker": pairs_XW[0].astype(int).tolist()}

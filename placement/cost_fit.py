"""Fits of the cost model's rates (placement.cost) to measurements taken on any machine, and the
error of its predictions.

Legend (docs/architecture.md): X any number of rows (measured cases), S slots of one worker's launch.

Every fit is scale-free: its search box comes from the measurements themselves, searched in log
space where a rate spans decades, by grid zoom (`_zoom_grid`), so one call fits a CPU's GFLOP/s
and a loopback Gloo exchange as well as a GPU's TFLOP/s and NVLink. Each minimises the mean
|log(predicted / measured)| with the formula of the model it fits (`StepCostModel.slot_seconds` /
`compute_seconds`, `predict_exchange_ranks`, `StepCostModel.host_seconds`).
`fit_kernel_rates` / `fit_link_rates` in placement.cost keep the committed H200 tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.cost import ExpertShape, HostRates, KernelRates, LinkRates, StepCostModel


@dataclass(frozen=True)
class SlotCase:
    """One measured grouped-kernel launch on one worker: the rows and width (fraction of F) of each
    of its slots (rows 0: an untouched slot), the expert shape, the measured seconds."""

    name: str
    rows_S: tuple
    width_S: tuple
    hidden: int
    ffn: int
    seconds: float
    weight_bytes: float = 2.0


def predict_slot_case(case: SlotCase, rates: KernelRates) -> float:
    """StepCostModel.compute_seconds of the case's slots as one worker's launch."""
    shape = ExpertShape(case.name, case.hidden, case.ffn, 1, case.weight_bytes)
    rows = np.asarray(case.rows_S, dtype=np.float64)[None]
    width = np.asarray(case.width_S, dtype=np.float64)[None]
    return float(StepCostModel(shape, rates).compute_seconds(rows, width, rows.shape[1])[0, 0])


def _zoom_grid(objective, lo, hi, points: int, rounds: int, starts: int = 4):
    """Minimise objective(*axes) over a box by grid zoom: a `points`-per-axis grid (objective gets
    broadcastable axes and returns the grid of values) over the box; from each of its `starts` best
    points, rounds of re-centring a grid on the best point and halving every axis' span (clipped to
    the box). Several starts keep a narrow valley (flops rate against tile rows) from trapping the
    zoom in a coarse cell's local minimum. Returns (best coordinates, best value)."""
    box_lo, box_hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)

    def grid(lo, hi):
        axes = [np.linspace(a, b, points) for a, b in zip(lo, hi)]
        shaped = [ax.reshape([-1 if i == j else 1 for j in range(len(axes))]) for i, ax in enumerate(axes)]
        return axes, np.nan_to_num(objective(*shaped), nan=np.inf)

    axes, values = grid(box_lo, box_hi)
    first_span = (box_hi - box_lo) / (points - 1)
    results = []
    for flat in np.argsort(values, axis=None, kind="stable")[:starts]:
        index = np.unravel_index(flat, values.shape)
        best = np.array([ax[i] for ax, i in zip(axes, index)])
        best_value = float(values[index])
        span = first_span
        for _ in range(rounds):
            lo, hi = np.maximum(best - span, box_lo), np.minimum(best + span, box_hi)
            sub_axes, sub_values = grid(lo, hi)
            index = np.unravel_index(np.argmin(sub_values), sub_values.shape)
            if sub_values[index] <= best_value:
                best, best_value = np.array([ax[i] for ax, i in zip(sub_axes, index)]), float(sub_values[index])
            span = span / 2
        results.append((best_value, tuple(best)))
    best_value, best = min(results)
    return np.array(best), best_value


def fit_kernel_rates_to(cases: list[SlotCase], floor_s: float | None = None, slot_s: float | None = None,
                        points: int = 9, rounds: int = 12, source: str = "fit_kernel_rates_to") -> KernelRates:
    """Flops rate, tile rows, weight streaming rate, per-slot seconds and launch floor (`floor_s`,
    `slot_s`: fixed when given) minimising the mean |log(predicted / measured)| over `cases`.

    Tile rows (scaled by a shard's width: tile padding) and per-slot seconds (not scaled: a host
    loop's per-slot overhead) are told apart only by cases with widths < 1: calibrate on some."""
    if not cases:
        raise ValueError("no cases to fit")
    width = max(len(c.rows_S) for c in cases)
    rows_XS = np.zeros((len(cases), width))
    width_XS = np.zeros((len(cases), width))
    for i, c in enumerate(cases):
        rows_XS[i, : len(c.rows_S)] = c.rows_S
        width_XS[i, : len(c.width_S)] = c.width_S
    width_XS = np.where(rows_XS > 0, width_XS, 0.0)
    touched_X = (rows_XS > 0).sum(axis=1).astype(np.float64)
    fpr_X = np.array([6.0 * c.hidden * c.ffn for c in cases])
    wbytes_X = np.array([3.0 * c.hidden * c.ffn * c.weight_bytes for c in cases])
    measured_X = np.array([c.seconds for c in cases], dtype=np.float64)
    if not (measured_X > 0).all():
        raise ValueError("every case needs a measured time > 0")
    flops_achieved = ((rows_XS * width_XS).sum(axis=1) * fpr_X / measured_X).max()
    bytes_X = width_XS.sum(axis=1) * wbytes_X / measured_X
    max_rows = max(float(rows_XS.max()), 1.0)
    fastest = float(measured_X.min())
    lo = [np.log(flops_achieved * 0.5), 0.0, np.log(max(bytes_X.min(), 1e-30) * 0.25), 0.0, 0.0]
    hi = [np.log(flops_achieved * 50.0), np.log1p(4.0 * max_rows), np.log(bytes_X.max() * 10.0), 2.0 * fastest, 2.0 * fastest]
    for axis, fixed in ((3, floor_s), (4, slot_s)):
        if fixed is not None:
            lo[axis] = hi[axis] = float(fixed)

    def objective(log_flops, log_tile, log_hbm, floor, per_slot):
        # [a,1,1,1,1] x [1,b,1,1,1] x [1,1,c,1,1] x [1,1,1,d,1] x [1,1,1,1,e] -> [a,b,c,d,e]; a loop
        # over flops keeps the [.., X, S] temporaries small; the per-slot term is summed per case
        out = np.empty((log_flops.size, log_tile.size, log_hbm.size, floor.size, per_slot.size))
        tile = np.expm1(log_tile.reshape(-1))[:, None, None, None]  # [b, 1, X, S]
        stream = (wbytes_X[:, None] / np.exp(log_hbm.reshape(-1))[:, None, None])[None]  # [1, c, X, 1]
        slot_eX = per_slot.reshape(-1)[:, None] * touched_X  # [e, X]
        for i, lf in enumerate(log_flops.reshape(-1)):
            compute = (rows_XS[None, None] + tile) * (fpr_X[:, None] / np.exp(lf))  # [b, 1, X, S]
            total = np.where(rows_XS > 0, width_XS * np.maximum(compute, stream), 0.0).sum(axis=-1)  # [b, c, X]
            total = total[:, :, None, :] + slot_eX  # [b, c, e, X]
            pred = np.maximum(total[:, :, None], floor.reshape(-1)[:, None, None])  # [b, c, d, e, X]
            out[i] = np.abs(np.log(np.maximum(pred, 1e-300) / measured_X)).mean(axis=-1)
        return out

    (log_flops, log_tile, log_hbm, floor, per_slot), _ = _zoom_grid(objective, lo, hi, points, rounds)
    return KernelRates(float(np.exp(log_flops)), float(np.expm1(log_tile)), float(np.exp(log_hbm)), float(floor),
                       source, float(per_slot))


def predict_exchange_ranks(bytes_per_rank: float, rates: LinkRates, num_ranks: int = 2) -> float:
    """One even all-to-all of `bytes_per_rank` on `num_ranks` ranks of one node: the share that
    leaves the rank, (W - 1) / W, over the intra-node link, plus the latency (W = 2: predict_exchange)."""
    return rates.latency_s + bytes_per_rank * (num_ranks - 1) / num_ranks / rates.intra_node_bytes_per_s


def fit_link_rates_to(rows: list[tuple[float, float]], num_ranks: int = 2, points: int = 25, rounds: int = 10,
                      source: str = "fit_link_rates_to") -> LinkRates:
    """Latency and intra-node bandwidth minimising the mean |log error| of `predict_exchange_ranks`
    over measured (bytes per rank, seconds) rows on `num_ranks` ranks. Inter-node: the LinkRates default."""
    if not rows:
        raise ValueError("no rows to fit")
    bytes_X = np.array([b for b, _ in rows], dtype=np.float64)
    seconds_X = np.array([t for _, t in rows], dtype=np.float64)
    moved_X = bytes_X * (num_ranks - 1) / num_ranks
    achieved = (moved_X / seconds_X).max()
    fastest = float(seconds_X.min())
    lo = [np.log(fastest * 1e-3), np.log(achieved * 0.5)]
    hi = [np.log(fastest * 2.0), np.log(achieved * 20.0)]

    def objective(log_latency, log_bw):
        pred = np.exp(log_latency)[..., None] + moved_X / np.exp(log_bw)[..., None]
        return np.abs(np.log(pred / seconds_X)).mean(axis=-1)

    (log_latency, log_bw), _ = _zoom_grid(objective, lo, hi, points, rounds)
    return LinkRates(float(np.exp(log_bw)), LinkRates.inter_node_bytes_per_s, float(np.exp(log_latency)), source)


def fit_host_rates_to(rows: list[tuple[float, float]], points: int = 25, rounds: int = 10,
                      source: str = "fit_host_rates_to") -> HostRates:
    """Fixed and per-row seconds of a layer's host work (`StepCostModel.host_seconds`) over measured
    (rows, seconds) pairs: fixed in [0, 2 x the fastest], per row in log space around the achieved."""
    if not rows:
        raise ValueError("no rows to fit")
    rows_X = np.array([r for r, _ in rows], dtype=np.float64)
    seconds_X = np.array([t for _, t in rows], dtype=np.float64)
    per_row = (seconds_X / np.maximum(rows_X, 1.0)).max()
    lo, hi = [0.0, np.log(per_row * 1e-3)], [2.0 * float(seconds_X.min()), np.log(per_row * 2.0)]

    def objective(fixed, log_per_row):
        pred = fixed[..., None] + np.exp(log_per_row)[..., None] * rows_X
        return np.abs(np.log(np.maximum(pred, 1e-300) / seconds_X)).mean(axis=-1)

    (fixed, log_per_row), _ = _zoom_grid(objective, lo, hi, points, rounds)
    return HostRates(float(fixed), float(np.exp(log_per_row)), source)


def log_errors(predicted, measured) -> dict:
    """mean and max |log(pred / meas)| and the mean absolute percentage error, over paired values."""
    predicted, measured = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if predicted.size == 0:
        return {"count": 0, "mean_abs_log": None, "max_abs_log": None, "mape": None}
    log_error = np.abs(np.log(predicted / measured))
    return {"count": int(predicted.size), "mean_abs_log": float(log_error.mean()), "max_abs_log": float(log_error.max()),
            "mape": float(np.mean(np.abs(predicted - measured) / measured))}

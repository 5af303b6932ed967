"""The coordinator's realised-rows history, summed and laid out for the stats view and the
placement report's timeline (moeray/coordinator_core.py keeps the ranges; no Ray here).

Legend: R step ranges, L layers, W workers.
"""

from __future__ import annotations

import numpy as np


def sum_rows(ranges, steps: int) -> tuple[np.ndarray | None, int]:
    """Sum of the ranges' rows [L, W], taken in the given order until `steps` steps are covered."""
    total, covered = None, 0
    for step_lo, step_hi, _, rows_LW in ranges:
        if covered >= steps:
            break
        total = rows_LW.astype(np.float64) if total is None else total + rows_LW
        covered += step_hi - step_lo
    return total, covered


def _imbalance_RL(rows_RLW: np.ndarray) -> np.ndarray:
    mean_RL = rows_RLW.mean(axis=2)
    return np.where(mean_RL > 0, rows_RLW.max(axis=2) / np.where(mean_RL > 0, mean_RL, 1.0), 1.0)


def step_timeline(ranges: list, window_steps: int) -> dict:
    """Columns, one entry per step range: where it was, its version, the rows computed, and the
    realised imbalance (mean and worst over layers) of the range alone and of the window ending
    with it (whole ranges back to `window_steps` steps, as realised_imbalance_per_layer)."""
    keys = ("step_lo", "step_hi", "version", "routed_rows", "imbalance_mean", "imbalance_worst",
            "window_imbalance_mean", "window_imbalance_worst")
    if not ranges:
        return {"window_steps": window_steps, **{key: [] for key in keys}}
    rows_RLW = np.stack([h[3] for h in ranges]).astype(np.float64)
    covered_R = np.cumsum([h[1] - h[0] for h in ranges])
    rows_sum_RLW = np.cumsum(rows_RLW, axis=0)
    first_R = np.minimum(np.searchsorted(covered_R, covered_R - window_steps, side="right"), np.arange(len(ranges)))
    before_RLW = np.where((first_R > 0)[:, None, None], rows_sum_RLW[np.maximum(first_R - 1, 0)], 0.0)
    single_RL, window_RL = _imbalance_RL(rows_RLW), _imbalance_RL(rows_sum_RLW - before_RLW)
    return {
        "window_steps": window_steps,
        "step_lo": [int(h[0]) for h in ranges],
        "step_hi": [int(h[1]) for h in ranges],
        "version": [int(h[2]) for h in ranges],
        "routed_rows": rows_RLW.sum(axis=(1, 2)).astype(np.int64).tolist(),
        "imbalance_mean": single_RL.mean(axis=1).tolist(),
        "imbalance_worst": single_RL.max(axis=1).tolist(),
        "window_imbalance_mean": window_RL.mean(axis=1).tolist(),
        "window_imbalance_worst": window_RL.max(axis=1).tolist(),
    }


def rows_around_last_commit(records: list, ranges: list, window_steps: int) -> dict | None:
    """Realised rows per worker [L, W] over the window before the last committed rebalance
    and over the first window after it (None where no range was served yet)."""
    committed = [r for r in records if r.committed_at_step is not None]
    if not committed:
        return None
    last = committed[-1]
    step = last.committed_at_step
    before = [h for h in ranges if h[1] <= step and h[2] < last.version]
    after = [h for h in ranges if h[0] >= step and h[2] == last.version]
    before_LW, before_steps = sum_rows(reversed(before), window_steps)
    after_LW, after_steps = sum_rows(after, window_steps)
    return {"version": last.version, "committed_at_step": step,
            "before_version": before[-1][2] if before else None,
            "before_LW": before_LW, "before_steps": before_steps,
            "after_LW": after_LW, "after_steps": after_steps}

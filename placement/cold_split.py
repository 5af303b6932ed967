"""One layer step's split of its cold experts between host compute and on-demand fetch (issue
13's host tier, cold path "auto"): which touched cold experts to fetch so the modelled step is
shortest, and the modelled steps it compared. Pure numpy over a TierRates (placement.tiering,
which re-exports these); the layer calls it between its host sync and its launches.

Legend (docs/architecture.md): X any number of experts, K candidate splits (k = 0 .. X fetched).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from placement.tiering import TierRates


@dataclass(frozen=True)
class ColdSplit:
    """One step's split of its cold experts (split_cold_steps) and the modelled steps it weighed."""

    fetch_X: np.ndarray  # [X] bool: fetch (else compute on the host)
    step_s: float  # the modelled step of this split (the bias not applied)
    fetch_all_s: float  # the modelled step had every touched cold expert been fetched


def split_cold(rows_X: np.ndarray, rates: TierRates, device_s: float, expected: bool = False,
               host_margin: float = 0.0, host_bias: float = 1.0) -> np.ndarray:
    """[X] bool: which cold experts to fetch (the rest are computed on the host) so that the step
    (device part + fetches, host part; TierRates.concurrent) is shortest; device_s is the resident
    experts' part. host_margin: anything stays on the host only if that step is this fraction
    shorter than fetching every touched expert (the copies' rate repeats from run to run; the
    host's does not: a host bet must pay by a margin). host_bias: how much longer than modelled a
    step that leaves anything on the host runs, over the same for a step that fetches everything
    (the layer's own steps show it: moeray.tier_calibration.HostCalibration.split_bias); such
    steps are compared at host_bias x their modelled length.

    A fetch costs a fixed copy and device rows, a host expert its curve at its rows, which rises
    with rows, so the experts with most rows gain most from fetching: the answer is the k most
    loaded for some k. Every k is tried at once (prefix sums of the fetch costs, suffix sums of the
    host costs; the smallest k of the shortest steps): a few array operations, because the layer
    calls this between its host sync and its launches, where time is the step's."""
    return split_cold_steps(rows_X, rates, device_s, expected, host_margin, host_bias).fetch_X


def split_cold_steps(rows_X: np.ndarray, rates: TierRates, device_s: float, expected: bool = False,
                     host_margin: float = 0.0, host_bias: float = 1.0) -> ColdSplit:
    """split_cold's answer with the modelled steps it compared (the layer's planning reads them
    instead of modelling the split again: it runs between the host sync and the launches)."""
    if not 0.0 <= host_margin < 1.0:
        raise ValueError(f"host_margin must be in [0, 1), got {host_margin}")
    if not np.isfinite(host_bias) or host_bias <= 0:
        raise ValueError(f"host_bias must be finite and > 0, got {host_bias}")
    rows_X = np.asarray(rows_X, dtype=np.float64)
    order = np.lexsort((np.arange(len(rows_X)), -rows_X))
    rows_sorted = rows_X[order]
    fetch_K = np.concatenate([[0.0], np.cumsum(rates.fetch_costs(rows_sorted, expected))])  # fetch the first k
    host_K = np.concatenate([np.cumsum(rates.host_costs(rows_sorted, expected)[::-1])[::-1], [0.0]])  # host the rest
    host_K = rates.with_host_start(host_K)  # its start cost, wherever anything is left on the host
    device_K = device_s + fetch_K
    modelled_K = device_K + host_K - rates.overlap * np.minimum(device_K, host_K)
    step_K = np.where(host_K > 0, host_bias * modelled_K, modelled_K) if host_bias != 1.0 else modelled_K.copy()
    step_K[1:][rows_sorted <= 0] = np.inf  # an untouched expert is never fetched
    best = int(np.argmin(step_K))
    every = int((rows_sorted > 0).sum())  # k = every touched expert fetched
    if host_margin and step_K[best] > (1.0 - host_margin) * step_K[every]:
        best = every
    fetch_X = np.zeros(len(rows_X), dtype=bool)
    fetch_X[order[:best]] = True
    return ColdSplit(fetch_X, float(modelled_K[best]), float(modelled_K[every]))

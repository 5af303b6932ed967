"""The host tier's CPU expert math (issue 13), its rows padded to a few shapes.

On the H200 lease's Xeon (AMX bf16) torch runs a CPU bf16 matmul through a oneDNN primitive
built for its exact shape on first use: an OLMoE expert (D 2048, F 1024) took 1.3-6.3 ms the
first time a row count was seen against 0.3-1.7 ms a repeat (scripts/host_shape_probe.py,
docs/benchmarks/tier.md). Prefill gives every host expert a row count it has rarely seen, so
each one paid the build. Padding the rows up to one of 8 sizes per octave (at most 12.5% more
rows; exact up to 16 rows, where decode lives) bounds the shapes a process ever builds to ~8 per
octave, each once. Rows of a matmul are independent: a padding row changes no other row's result.
"""

from __future__ import annotations

import numpy as np
import torch

from moeray.kernels.reference import swiglu

EXACT_ROWS = 16  # up to here every row count is its own shape (decode's few)
SIZES_PER_OCTAVE = 8


def padded_rows(rows: int) -> int:
    """The row count `rows` rows are computed at: itself up to EXACT_ROWS, above it rounded up to
    a multiple of 2^(floor(log2 rows) - 3) (8 sizes per octave, powers of two exact)."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (int(rows).bit_length() - 1 - int(np.log2(SIZES_PER_OCTAVE)))
    return -(-rows // step) * step


class HostMath:
    """One layer's host experts' SwiGLU over padded rows; the padded input is a scratch buffer
    kept between steps (its rows past a step's own hold earlier steps' rows, or zeros: no other row reads them)."""

    def __init__(self):
        self._scratch_RD = None

    def run(self, x_cold_YD: torch.Tensor, starts_X: np.ndarray, slots: list[int], w13_XHD: torch.Tensor,
            w2_XDF: torch.Tensor, out_YD: torch.Tensor, at: int = 0) -> int:
        """Write y of these slots' rows (in `slots` order) into out_YD from row `at`, from the cold
        rows (grouped by slot); returns the row after the last written."""
        for x in slots:
            lo, hi = int(starts_X[x]), int(starts_X[x + 1])
            rows, padded = hi - lo, padded_rows(hi - lo)
            if padded == rows:
                out_YD[at:at + rows] = swiglu(x_cold_YD[lo:hi], w13_XHD[x], w2_XDF[x])
            else:
                x_RD = self._scratch(padded, x_cold_YD)
                x_RD[:rows] = x_cold_YD[lo:hi]
                out_YD[at:at + rows] = swiglu(x_RD, w13_XHD[x], w2_XDF[x])[:rows]
            at += rows
        return at

    def _scratch(self, rows: int, like_YD: torch.Tensor) -> torch.Tensor:
        """[rows, D] of the scratch, grown to exactly `rows` when short (padded sizes: few growths)."""
        scratch = self._scratch_RD
        if scratch is None or scratch.shape[0] < rows or scratch.shape[1:] != like_YD.shape[1:] \
                or scratch.dtype != like_YD.dtype:
            scratch = self._scratch_RD = torch.zeros(rows, like_YD.shape[1], dtype=like_YD.dtype)
        return scratch[:rows]

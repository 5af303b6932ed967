"""The host tier's CPU math over padded row counts (moeray.host_math) against swiglu of each
slot's own rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeray.host_math import HostMath, padded_rows
from moeray.kernels.reference import swiglu

D, F = 12, 20


def test_padded_rows_are_few_shapes_within_an_eighth_more_rows():
    assert [padded_rows(n) for n in (0, 1, 7, 16, 17, 18, 19, 32, 33, 100, 129, 1000, 1024, 1025)] == \
        [0, 1, 7, 16, 18, 18, 20, 32, 36, 104, 144, 1024, 1024, 1152]
    rows = np.arange(1, 4097)
    padded = np.array([padded_rows(int(n)) for n in rows])
    assert (padded >= rows).all() and (padded <= rows * 1.125).all()
    assert len(set(padded.tolist())) == 16 + 8 * 8  # exact to 16, then 8 per octave up to 4096


@pytest.mark.parametrize("rows", [[1], [17], [33, 1, 0, 100], [0, 0], [257, 16, 19]])
def test_host_math_over_padded_rows_equals_the_expert_by_expert_reference(rows):
    """The padded path (a scratch buffer reused from a larger step, its stale rows left in)
    against swiglu of each slot's own rows."""
    gen = torch.Generator().manual_seed(len(rows))
    X = len(rows)
    w13_XHD, w2_XDF = torch.randn(X, 2 * F, D, generator=gen), torch.randn(X, D, F, generator=gen)
    starts_X = np.concatenate([[0], np.cumsum(rows)])
    x_YD = torch.randn(int(starts_X[-1]), D, generator=gen)
    math = HostMath()
    math.run(torch.randn(600, D, generator=gen), np.array([0, 600]), [0], w13_XHD[:1], w2_XDF[:1],
             torch.empty(600, D))  # leaves stale rows in the scratch
    slots = [x for x in reversed(range(X))]  # out of slot order, as a split gives them
    out_YD = torch.full((int(starts_X[-1]) + 2, D), float("nan"))
    end = math.run(x_YD, starts_X, slots, w13_XHD, w2_XDF, out_YD, at=2)
    assert end == 2 + int(starts_X[-1])
    want = [swiglu(x_YD[starts_X[x]:starts_X[x + 1]], w13_XHD[x], w2_XDF[x]) for x in slots]
    torch.testing.assert_close(out_YD[2:], torch.cat(want), rtol=1e-5, atol=1e-5)

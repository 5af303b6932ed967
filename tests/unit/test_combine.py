"""The weighted un-permute (moeray.kernels.combine) against a float64 loop, on awkward sizes.

Legend: T tokens, K top-k, N = T*K pairs, D hidden.

The Triton kernel runs under TRITON_INTERPRET=1 in a subprocess (as in test_kernels.py: the flag
must be set before triton compiles anything and must not leak into GPU tests).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

CASES = {  # name: (T, K, D)
    "one_token_k1": (1, 1, 5),
    "one_token_k8": (1, 8, 24),
    "ragged_blocks": (7, 3, 100),   # T not a multiple of the token block, D of the column block
    "wide_rows": (9, 2, 1030),      # several column blocks, the last one partial
    "no_tokens": (0, 2, 16),
}
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(name: str, dtype: torch.dtype, seed: int = 0):
    T, K, D = CASES[name]
    g = torch.Generator().manual_seed(seed + T * 31 + K)
    rows_XD = torch.randn(T * K, D, generator=g).to(dtype)
    send_order_X = torch.randperm(T * K, generator=g)
    weights_TK = torch.rand(T, K, generator=g)
    return rows_XD, send_order_X, weights_TK


def loop_f64(rows_XD, send_order_X, weights_TK):
    """Independent of both implementations: pair n = t*K + k sits at row i where send_order[i] = n."""
    T, K = weights_TK.shape
    out = torch.zeros(T, rows_XD.shape[1], dtype=torch.float64)
    for i, n in enumerate(send_order_X.tolist()):
        t, k = divmod(n, K)
        out[t] += float(weights_TK[t, k]) * rows_XD[i].double()
    return out


def rel_err(y, ref) -> float:
    if not torch.isfinite(y).all():
        return float("nan")
    denom = ref.norm().item()
    diff = (y.double() - ref).norm().item()
    return diff / denom if denom > 0 else diff


def run_triton_cases() -> dict[str, float]:
    from moeray.kernels.combine import unpermute_weighted

    out = {}
    for name in CASES:
        for dname, dtype in DTYPES.items():
            args = build(name, dtype)
            y = unpermute_weighted(*args, impl="triton")
            assert y.dtype == dtype and y.shape == (CASES[name][0], CASES[name][2])
            out[f"{name}-{dname}"] = rel_err(y, loop_f64(*args))
    return out


@pytest.fixture(scope="module")
def triton_results() -> dict[str, float]:
    from tests.helpers import results_from_triton_interpreter

    return results_from_triton_interpreter(__file__)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreter(triton_results, name, dname):
    assert triton_results[f"{name}-{dname}"] < TOL[DTYPES[dname]]


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_reference(name, dname):
    from moeray.kernels.combine import unpermute_weighted

    dtype = DTYPES[dname]
    args = build(name, dtype, seed=1)
    y = unpermute_weighted(*args, impl="reference")
    assert y.dtype == dtype and rel_err(y, loop_f64(*args)) < TOL[dtype]
    assert torch.equal(unpermute_weighted(*args), y)  # "auto" on CPU is the reference


def test_rejects_bad_arguments():
    from moeray.kernels.combine import unpermute_weighted

    rows, order, w = build("ragged_blocks", torch.float32)
    with pytest.raises(ValueError, match="impl"):
        unpermute_weighted(rows, order, w, impl="fast")
    with pytest.raises(ValueError, match="T\\*K = 21"):
        unpermute_weighted(rows[:-1], order, w)


if __name__ == "__main__":  # the interpreter worker (TRITON_INTERPRET=1 set by the fixture)
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_triton_cases()))

"""Expert kernels on a CUDA GPU: every impl vs float64, bf16 on larger shapes; no host syncs.

Legend: M rows of x, N listed rows, S slots, D hidden, F ffn width, H = 2F.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def make(M, N, S, D, F, dtype, seed=0, sorted_x=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x_MD = torch.randn(M, D, device="cuda", generator=g).to(dtype)
    w13_SHD = (torch.randn(S, 2 * F, D, device="cuda", generator=g) / D**0.5).to(dtype)
    w2_SDF = (torch.randn(S, D, F, device="cuda", generator=g) / F**0.5).to(dtype)
    # skewed counts with some empty slots
    p = torch.rand(S, device="cuda", generator=g) ** 3
    if S > 1:
        p[:: max(2, S // 3)] = 0  # leaves index 1 (and others) non-zero
    slot_X = torch.multinomial(p / p.sum(), N, replacement=True, generator=g).sort().values
    offs_S1 = torch.cat([slot_X.new_zeros(1), torch.bincount(slot_X, minlength=S).cumsum(0)])
    order_X = None if sorted_x else torch.randperm(M, device="cuda", generator=g)[:N]
    return x_MD, w13_SHD, w2_SDF, offs_S1, order_X


def dense_f64(x_MD, w13_SHD, w2_SDF, offs_S1, order_X):
    M, D = x_MD.shape
    F = w2_SDF.shape[2]
    N = offs_S1[-1].item()
    order_X = torch.arange(M, device=x_MD.device) if order_X is None else order_X
    slot_X = torch.searchsorted(offs_S1, torch.arange(N, device=x_MD.device), right=True) - 1
    y_MD = torch.zeros(M, D, dtype=torch.float64, device=x_MD.device)
    x_XD = x_MD.double()[order_X]
    for s in slot_X.unique().tolist():  # per slot, but in float64 and through a boolean mask
        m = slot_X == s
        h13 = x_XD[m] @ w13_SHD[s].double().T
        y_MD[order_X[m]] = (torch.nn.functional.silu(h13[:, :F]) * h13[:, F:]) @ w2_SDF[s].double().T
    return y_MD


def rel(y, ref):
    assert torch.isfinite(y).all(), "unwritten (NaN-poisoned) or non-finite output"
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.fixture
def poisoned(monkeypatch):
    from moeray.kernels import grouped_mm, triton_swiglu

    for mod in (grouped_mm, triton_swiglu):
        orig = mod._empty
        monkeypatch.setattr(mod, "_empty", lambda shape, like, orig=orig: orig(shape, like).fill_(float("nan")))


SHAPES = [  # M, N, S, D, F
    (1, 1, 1, 512, 256),
    (40, 40, 8, 1024, 704),  # decode-like
    (3000, 2900, 16, 2048, 768),  # missing rows
    (4096, 4096, 8, 1024, 1408),
    (600, 600, 64, 256, 2048),  # many slots
]


@pytest.mark.parametrize("impl", ["reference", "triton", "grouped_mm", "auto"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bf16(poisoned, impl, shape):
    from moeray.kernels import expert_mlp

    args = make(*shape, torch.bfloat16, seed=sum(shape))
    assert rel(expert_mlp(*args, impl=impl), dense_f64(*args)) < 2e-2


@pytest.mark.parametrize("sorted_x", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_awkward(poisoned, dtype, sorted_x):
    from moeray.kernels import expert_mlp

    M = 77
    args = make(M, M if sorted_x else 70, 5, 24, 40, dtype, seed=3, sorted_x=sorted_x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(expert_mlp(*args, impl="triton"), dense_f64(*args)) < tol


@pytest.mark.parametrize("impl", ["triton", "grouped_mm"])
def test_no_host_sync(impl):
    from moeray.kernels import expert_mlp

    args = make(512, 500, 8, 256, 512, torch.bfloat16, seed=5)
    expert_mlp(*args, impl=impl)  # compile / warm up first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        expert_mlp(*args, impl=impl)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("shape", [(1, 1, 1, 64, 96), (77, 70, 5, 24, 40), (3000, 2900, 16, 2048, 768)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_shard_widths(poisoned, dtype, shape):
    """Sharded slots (columns first, zeros after): the Triton kernel given width_S equals float64
    over the same zero-padded weights, for widths 1, odd, tile-straddling and whole; no host sync."""
    from moeray.kernels import expert_mlp

    x_MD, w13_SHD, w2_SDF, offs_S1, order_X = make(*shape, dtype, seed=11)
    S, F = w13_SHD.shape[0], w2_SDF.shape[2]
    g = torch.Generator().manual_seed(sum(shape))
    width_S = torch.randint(1, F + 1, (S,), generator=g)
    width_S[0], width_S[-1] = 1, F
    cols = torch.arange(F)[None, :] < width_S[:, None]  # [S, F]
    keep_SH = torch.cat([cols, cols], 1).to("cuda")
    w13_SHD = w13_SHD * keep_SH[:, :, None]
    w2_SDF = w2_SDF * cols.to("cuda")[:, None, :]
    width_S = width_S.to("cuda")
    got = expert_mlp(x_MD, w13_SHD, w2_SDF, offs_S1, order_X, impl="triton", width_S=width_S)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(got, dense_f64(x_MD, w13_SHD, w2_SDF, offs_S1, order_X)) < tol
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        expert_mlp(x_MD, w13_SHD, w2_SDF, offs_S1, order_X, impl="triton", width_S=width_S)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("T,K,D", [(1, 1, 7), (1, 8, 7168), (37, 3, 1030), (4096, 8, 7168)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_weighted_triton(T, K, D, dtype):
    """The fused weighted un-permute equals the float64 scatter-and-sum."""
    from moeray.kernels.combine import unpermute_weighted

    g = torch.Generator(device="cuda").manual_seed(T + K + D)
    rows_XD = torch.randn(T * K, D, device="cuda", generator=g).to(dtype)
    send_order_X = torch.randperm(T * K, device="cuda", generator=g)
    weights_TK = torch.rand(T, K, device="cuda", generator=g)
    y_XD = torch.empty(T * K, D, dtype=torch.float64, device="cuda")
    y_XD[send_order_X] = rows_XD.double()
    ref_TD = (y_XD.view(T, K, D) * weights_TK.double().unsqueeze(-1)).sum(1)
    out_TD = unpermute_weighted(rows_XD, send_order_X, weights_TK, impl="triton")
    assert out_TD.dtype == dtype
    err = ((out_TD.double() - ref_TD).norm() / ref_TD.norm()).item()
    assert err < (1e-6 if dtype == torch.float32 else 1e-2), err

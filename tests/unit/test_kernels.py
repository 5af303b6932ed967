"""Expert kernels vs a float64 dense computation, on awkward sizes (CPU).

Legend: M rows of x, N listed (token, slot) rows, S slots, D hidden, F ffn width, H = 2F.

The Triton kernels run under TRITON_INTERPRET=1 in a subprocess: the flag must be set before
triton compiles anything, and setting it in this process would leak into GPU tests run in the
same pytest session. Outputs the kernels must fully write are poisoned with NaN first, so a
row that was skipped shows up as NaN and fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# name: (M, S, D, F, counts per slot, order kind). order kind: "perm" = unsorted order, listing
# the first N rows of a random permutation (missing rows when N < M); "none" = x already sorted.
CASES = {
    "one_row": (1, 1, 24, 40, [1], "perm"),
    "one_row_many_slots": (1, 4, 24, 40, [0, 0, 1, 0], "perm"),
    "empty_slots_missing_rows": (13, 5, 24, 40, [0, 3, 0, 6, 0], "perm"),
    "sorted_multiblock": (37, 3, 24, 40, [20, 0, 17], "none"),
    "zero_rows": (4, 3, 24, 40, [0, 0, 0], "perm"),
    "many_slots": (50, 20, 40, 24, [0, 5, 1, 0, 9, 2, 0, 3, 4, 0, 1, 7, 0, 0, 6, 2, 3, 0, 5, 2], "perm"),
}
# Sharded slots (moeray.expert_parallel's layout: a shard's columns first): FFN columns each slot
# uses, for the cases that run with widths too. Weights past a slot's width hold noise in these
# tests, so a gate/up pass that reads weights past the width fails (the Triton down pass reads h
# and w2 columns up to its next K block, where h is 0, so noise there adds nothing).
WIDTHS = {
    "one_row": [17],
    "empty_slots_missing_rows": [40, 13, 40, 27, 1],
    "sorted_multiblock": [20, 40, 33],
    "many_slots": [24, 5, 12, 24, 7, 24, 1, 16, 9, 24, 3, 18, 24, 24, 11, 24, 8, 2, 24, 13],
}
# Tile configs for the Triton runs: None = the default table; "tiny" forces many M-blocks and
# N-tiles per slot and GROUP_M swizzle groups; BK=16 leaves a partial K tile for D or F = 24, 40.
TINY = dict(BM=16, BN=16, BK=16, GROUP_M=2, num_warps=1, num_stages=1)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(name: str, dtype: torch.dtype, seed: int = 0):
    M, S, D, F, counts, kind = CASES[name]
    g = torch.Generator().manual_seed(seed + len(name))
    x_MD = torch.randn(M, D, generator=g).to(dtype)
    w13_SHD = (torch.randn(S, 2 * F, D, generator=g) / D**0.5).to(dtype)
    w2_SDF = (torch.randn(S, D, F, generator=g) / F**0.5).to(dtype)
    offs_S1 = torch.tensor([0] + counts).cumsum(0)
    N = sum(counts)
    order_X = None if kind == "none" else torch.randperm(M, generator=g)[:N]
    if kind == "none":
        assert N == M
    return x_MD, w13_SHD, w2_SDF, offs_S1, order_X


def truncated(w13_SHD, w2_SDF, width_S):
    """The weights a sharded slot means: columns past its width zeroed."""
    F = w2_SDF.shape[2]
    used_SF = torch.arange(F)[None, :] < torch.as_tensor(width_S)[:, None]
    return w13_SHD * used_SF.repeat(1, 2)[:, :, None], w2_SDF * used_SF[:, None, :]


def dense_f64(x_MD, w13_SHD, w2_SDF, offs_S1, order_X, width_S=None):
    """Independent of the slot loop: every listed row gets its slot's weights gathered, in float64."""
    M, _ = x_MD.shape
    S, H, _ = w13_SHD.shape
    F = H // 2
    if width_S is not None:
        w13_SHD, w2_SDF = truncated(w13_SHD, w2_SDF, width_S)
    N = int(offs_S1[-1])
    order_X = torch.arange(M) if order_X is None else order_X
    slot_X = torch.searchsorted(offs_S1, torch.arange(N), right=True) - 1
    x_XD = x_MD.double()[order_X]
    h13_XH = torch.einsum("nd,nhd->nh", x_XD, w13_SHD.double()[slot_X])
    h_XF = torch.nn.functional.silu(h13_XH[:, :F]) * h13_XH[:, F:]
    y_MD = torch.zeros(M, x_MD.shape[1], dtype=torch.float64)
    y_MD[order_X] = torch.einsum("nf,ndf->nd", h_XF, w2_SDF.double()[slot_X])
    return y_MD


def rel_err(y, ref) -> float:
    if not torch.isfinite(y).all():
        return float("nan")  # a poisoned (unwritten) element survived
    denom = ref.norm().item()
    diff = (y.double() - ref).norm().item()
    return diff / denom if denom > 0 else diff


def poison(module) -> None:
    orig = module._empty
    module._empty = lambda shape, like: orig(shape, like).fill_(float("nan"))


def run_triton_cases() -> dict[str, float]:
    """Runs in the interpreter subprocess; returns {case-dtype-config: relative error}."""
    from moeray.kernels import triton_swiglu as ts

    poison(ts)
    out = {}
    for name in CASES:
        for dname, dtype in DTYPES.items():
            for cname, cfg in (("default", None), ("tiny", ts.TileConfig(**TINY))):
                args = build(name, dtype)
                y = ts.expert_mlp_triton(*args, cfg_up=cfg, cfg_down=cfg)
                out[f"{name}-{dname}-{cname}"] = rel_err(y, dense_f64(*args))
                if name in WIDTHS:
                    width_S = torch.tensor(WIDTHS[name])
                    y = ts.expert_mlp_triton(*args, cfg_up=cfg, cfg_down=cfg, width_S=width_S)
                    out[f"{name}-{dname}-{cname}-widths"] = rel_err(y, dense_f64(*args, width_S))
    return out


@pytest.fixture(scope="module")
def triton_results() -> dict[str, float]:
    from tests.helpers import results_from_triton_interpreter

    return results_from_triton_interpreter(__file__)


@pytest.mark.parametrize("cfg", ["default", "tiny"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreter(triton_results, name, dname, cfg):
    err = triton_results[f"{name}-{dname}-{cfg}"]
    assert err < TOL[DTYPES[dname]], err  # NaN (unwritten row) fails too


@pytest.mark.parametrize("cfg", ["default", "tiny"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("name", list(WIDTHS))
def test_triton_interpreter_widths(triton_results, name, dname, cfg):
    """Sharded slots: only each slot's columns are computed (noise past them never read)."""
    err = triton_results[f"{name}-{dname}-{cfg}-widths"]
    assert err < TOL[DTYPES[dname]], err


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("name", list(WIDTHS))
def test_reference_widths(name, dname):
    from moeray.kernels import expert_mlp

    dtype = DTYPES[dname]
    args = build(name, dtype, seed=2)
    width_S = torch.tensor(WIDTHS[name])
    assert rel_err(expert_mlp(*args, impl="reference", width_S=width_S), dense_f64(*args, width_S)) < TOL[dtype]
    # zero-padded shards (the engine's layout) give the same result without widths (grouped_mm's way)
    x_MD, w13_SHD, w2_SDF, offs_S1, order_X = args
    padded = truncated(w13_SHD, w2_SDF, width_S)
    assert rel_err(expert_mlp(x_MD, *padded, offs_S1, order_X, impl="reference"), dense_f64(*args, width_S)) < TOL[dtype]


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_reference(name, dname):
    from moeray.kernels import expert_mlp

    dtype = DTYPES[dname]
    args = build(name, dtype, seed=1)
    assert rel_err(expert_mlp(*args, impl="reference"), dense_f64(*args)) < TOL[dtype]
    # "auto" on CPU is the reference
    assert torch.equal(expert_mlp(*args, impl="auto"), expert_mlp(*args, impl="reference"))


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_grouped_mm_cpu(name, dname, monkeypatch):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    from moeray.kernels import expert_mlp
    from moeray.kernels import grouped_mm as gm

    orig = gm._empty
    monkeypatch.setattr(gm, "_empty", lambda shape, like: orig(shape, like).fill_(float("nan")))
    dtype = DTYPES[dname]
    args = build(name, dtype, seed=2)
    try:
        y = expert_mlp(*args, impl="grouped_mm")
    except (RuntimeError, NotImplementedError) as e:  # older torch: no CPU fallback
        pytest.skip(f"torch._grouped_mm on CPU: {e}")
    assert rel_err(y, dense_f64(*args)) < TOL[dtype]


def test_tile_shared_memory_fits_hopper():
    """Every tile in the table fits the H100/H200 227 KB of shared memory per block, fp32 included
    (A tile + the B tiles, times the pipeline stages; gate/up loads two B tiles)."""
    pytest.importorskip("triton")
    from moeray.kernels.triton_swiglu import _TABLE, pick_configs

    for r_max, f_min, _, _ in _TABLE:
        N = int(min(r_max, 4096)) * 8
        for itemsize in (2, 4):
            up, down = pick_configs(N, 8, 4096, max(f_min, 768), itemsize)
            for cfg, n_b in ((up, 2), (down, 1)):
                smem = cfg.num_stages * (cfg.BM + n_b * cfg.BN) * cfg.BK * itemsize
                assert smem <= 227 * 1024, (cfg, itemsize, smem)


def test_rejects_bad_arguments():
    from moeray.kernels import expert_mlp

    x, w13, w2, offs, order = build("empty_slots_missing_rows", torch.float32)
    with pytest.raises(ValueError, match="impl"):
        expert_mlp(x, w13, w2, offs, order, impl="fast")
    with pytest.raises(ValueError, match="slot_offsets"):
        expert_mlp(x, w13, w2, offs[:-1], order)
    with pytest.raises(ValueError, match="shape"):
        expert_mlp(x, w13, w2[:, :, :-1], offs, order)


if __name__ == "__main__":  # the interpreter worker (TRITON_INTERPRET=1 set by the fixture)
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_triton_cases()))


def test_compile_tiles_launches_every_configuration_at_the_given_slot_count(monkeypatch):
    """compile_tiles launches each tile configuration of the table once, with that configuration
    passed explicitly, at the weights' S slots (every row in slot 0), once per process and shape."""
    pytest.importorskip("triton")
    from moeray.kernels import triton_swiglu

    calls = []

    def record(x_RD, w13_SHD, w2_SDF, offsets_S1, order_R, cfg_up, cfg_down):
        calls.append((x_RD.shape[0], w13_SHD.shape[0], offsets_S1.tolist(), order_R.tolist(), cfg_up, cfg_down))

    monkeypatch.setattr(triton_swiglu, "expert_mlp_triton", record)
    monkeypatch.setattr(triton_swiglu, "_COMPILED", set())
    S, D, F = 16, 24, 40
    w13_SHD, w2_SDF = torch.zeros(S, 2 * F, D), torch.zeros(S, D, F)
    compiled = triton_swiglu.compile_tiles(w13_SHD, w2_SDF)
    configs = {triton_swiglu.pick_configs(rows, 1, D, F, 4) for rows, *_ in calls}
    assert compiled == len(calls) == len(configs) >= 4  # the table's distinct rows for F < 8192
    for rows, slots, offsets, order, cfg_up, cfg_down in calls:
        assert slots == S and offsets == [0] + [rows] * S and order == list(range(rows))
        assert (cfg_up, cfg_down) == triton_swiglu.pick_configs(rows, 1, D, F, 4)  # not re-picked at S slots
    assert triton_swiglu.compile_tiles(w13_SHD, w2_SDF) == 0 and len(calls) == compiled  # once per class
    assert triton_swiglu.compile_tiles(w13_SHD[:1], w2_SDF[:1]) == compiled  # another slot-count class

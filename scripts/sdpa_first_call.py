"""First-call cost of the batched attention's SDPA per new (N, C) shape, by backend (one GPU).
The eager prefill's shapes change with every prompt length and block count.
usage: python scripts/sdpa_first_call.py"""
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

dev = "cuda"
A, J, Y = 32, 8, 128


def call(B, N, C):
    q = torch.randn(B, A, N, Y, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, J, C, Y, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, J, C, Y, device=dev, dtype=torch.bfloat16)
    mask = torch.ones(B, 1, N, C, device=dev, dtype=torch.bool).tril(C - N)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0)


backends = {"default": None, "efficient": [SDPBackend.EFFICIENT_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
            "flash": [SDPBackend.FLASH_ATTENTION], "math": [SDPBackend.MATH]}
call(1, 16, 32)  # CUDA context, cuBLAS
for name, allowed in backends.items():
    rows = []
    for i, (B, N, C) in enumerate([(1, 128, 144), (1, 128, 160), (1, 131, 176), (16, 128, 144), (64, 128, 160), (64, 1, 160)]):
        try:
            if allowed is None:
                first, second = call(B, N + i, C + 16 * i), call(B, N + i, C + 16 * i)
            else:
                with sdpa_kernel(allowed):
                    first, second = call(B, N + i, C + 16 * i), call(B, N + i, C + 16 * i)
            rows.append(f"B{B} N{N + i} C{C + 16 * i}: {first:.1f}/{second:.2f}")
        except RuntimeError as exc:
            rows.append(f"B{B} N{N + i}: n/a ({str(exc)[:60]})")
    print(f"{name:9s} first/second ms: " + "; ".join(rows), flush=True)

"""Attention over the paged cache: the batched path against the reference loop, both against a
brute-force softmax over contiguous keys (no cache), on awkward sizes; and the empty step (T = 0).

Legend: T tokens in the step, C context positions, A query heads, J key/value heads,
Y key head dim, U value head dim, D hidden.
"""

import math

import pytest
import torch

from moeray.config import tiny_model_config
from moeray.models.attention import attend, attend_batched, attend_reference
from moeray.models.decoder import MoECausalLM, init_random_
from moeray.models.kv_cache import AttentionBatch, PagedKVCache, SeqSpan


def brute_force(q_NAY, k_CJY, v_CJU, start, scale):
    """Causal softmax attention of queries at positions start.. over one sequence's contiguous keys."""
    group = q_NAY.shape[1] // k_CJY.shape[1]
    out = torch.empty(q_NAY.shape[0], q_NAY.shape[1], v_CJU.shape[2], dtype=torch.float64)
    for n in range(q_NAY.shape[0]):
        visible = start + n + 1
        for a in range(q_NAY.shape[1]):
            k = k_CJY[:visible, a // group].double()
            scores = (k @ q_NAY[n, a].double()) * scale
            out[n, a] = torch.softmax(scores, 0) @ v_CJU[:visible, a // group].double()
    return out


def build_case(seed, block_size, contexts, num_new, heads, kv_heads, k_dim, v_dim):
    """A cache whose sequences hold random keys/values at 0..context-1 (the step's own tokens
    included, as after `cache.write`), in shuffled, non-contiguous blocks; plus the step's queries."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [math.ceil(c / block_size) for c in contexts]
    num_blocks = sum(blocks_needed) + 2  # spare blocks stay unused: garbage the mask must hide
    order = torch.randperm(num_blocks, generator=gen).tolist()
    cache = PagedKVCache(1, num_blocks, block_size, kv_heads, k_dim, v_dim, torch.float32)
    cache.k[0].normal_(generator=gen)
    cache.v[0].normal_(generator=gen)
    spans, full_kv = [], []
    for ctx, new, need in zip(contexts, num_new, blocks_needed):
        ids, order = tuple(order[:need]), order[need:]
        spans.append(SeqSpan(ids, ctx - new, new))
        k_CJY = torch.cat([cache.k[0][b] for b in ids])[:ctx]
        v_CJU = torch.cat([cache.v[0][b] for b in ids])[:ctx]
        full_kv.append((k_CJY, v_CJU))
    batch = AttentionBatch.build(spans, block_size)
    q_TAY = torch.randn(batch.num_tokens, heads, k_dim, generator=gen)
    return cache, batch, q_TAY, full_kv


CASES = {
    "one-token-one-seq": dict(block_size=4, contexts=[1], num_new=[1]),
    "decode-several-blocks": dict(block_size=3, contexts=[7, 1, 12, 4], num_new=[1, 1, 1, 1]),
    "block-size-1": dict(block_size=1, contexts=[5, 2, 9], num_new=[1, 2, 9]),
    "block-size-3-mixed": dict(block_size=3, contexts=[10, 4, 3], num_new=[10, 1, 2]),
    "prefill-one-seq-many-blocks": dict(block_size=4, contexts=[23], num_new=[23]),
    "chunked-prefill": dict(block_size=5, contexts=[17, 6], num_new=[6, 6]),
}
HEADS = {"gqa-3-groups": (6, 2, 8, 8), "mha": (3, 3, 4, 4), "mla-like-Y-ne-U": (4, 4, 12, 6)}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("heads", sorted(HEADS))
def test_batched_equals_reference_equals_brute_force(case, heads):
    num_heads, kv_heads, k_dim, v_dim = HEADS[heads]
    cache, batch, q_TAY, full_kv = build_case(7, heads=num_heads, kv_heads=kv_heads, k_dim=k_dim, v_dim=v_dim,
                                              **CASES[case])
    scale = k_dim ** -0.5
    ref_TAU = attend_reference(q_TAY, cache, 0, batch, scale)
    fast_TAU = attend_batched(q_TAY, cache, 0, batch, scale)
    assert ref_TAU.shape == fast_TAU.shape == (batch.num_tokens, num_heads, v_dim)
    torch.testing.assert_close(fast_TAU, ref_TAU, rtol=1e-5, atol=1e-5)
    for seq, (k_CJY, v_CJU) in enumerate(full_kv):
        lo, hi = batch.query_start_B1[seq], batch.query_start_B1[seq + 1]
        want = brute_force(q_TAY[lo:hi], k_CJY, v_CJU, batch.starts[seq], scale).float()
        torch.testing.assert_close(ref_TAU[lo:hi], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attend(q_TAY, cache, 0, batch, scale), fast_TAU, rtol=0, atol=0)


def test_unknown_impl_is_rejected():
    cache, batch, q_TAY, _ = build_case(0, 4, [3], [3], 2, 1, 4, 4)
    with pytest.raises(ValueError, match="'fast'"):
        attend(q_TAY, cache, 0, batch, 1.0, impl="fast")


@pytest.mark.parametrize("impl", ["reference", "batched"])
def test_empty_step_returns_empty(impl):
    cache = PagedKVCache(1, 2, 4, 2, 8, 6, torch.float32)
    batch = AttentionBatch.build([], 4)
    q_TAY = torch.zeros(0, 4, 8)
    assert attend(q_TAY, cache, 0, batch, 0.3, impl).shape == (0, 4, 6)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_model_with_zero_tokens_returns_empty_hidden(family):
    cfg = tiny_model_config(family)
    model = init_random_(MoECausalLM(cfg), seed=0)
    cache = model.new_cache(num_blocks=2, block_size=4)
    h_TD = model(torch.zeros(0, dtype=torch.int64), AttentionBatch.build([], 4), cache)
    assert h_TD.shape == (0, cfg.hidden_size)
    assert model.compute_logits(h_TD).shape == (0, cfg.vocab_size)
    assert not any(k.any() for k in cache.k), "an empty step writes nothing"

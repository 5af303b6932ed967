"""Single-process greedy generation over one model with its own KV cache: the slow, obviously
correct reference the engine's generation is compared with (and the demo's self-check).

Legend: T tokens, V vocab.
"""

from __future__ import annotations

import torch

from moeray.generation.blocks import blocks_needed
from moeray.models.kv_cache import AttentionBatch, PagedKVCache, SeqSpan


@torch.no_grad()
def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, eos_token_ids=(), block_size: int = 4) -> list[int]:
    """Prefill the prompt, then decode one token at a time (argmax), stopping at EOS (included)."""
    cfg = model.cfg
    num_kv_heads, k_dim, v_dim = cfg.kv_cache_spec
    param = next(model.parameters())
    total = len(prompt_ids) + max_new_tokens
    blocks = tuple(range(blocks_needed(total, block_size)))
    cache = PagedKVCache(cfg.num_hidden_layers, len(blocks), block_size, num_kv_heads, k_dim, v_dim,
                         param.dtype, param.device)
    tokens, out = list(prompt_ids), []
    cached = 0
    while len(out) < max_new_tokens:
        batch = AttentionBatch.build([SeqSpan(blocks, cached, len(tokens) - cached)], block_size, param.device)
        ids_T = torch.tensor(tokens[cached:], dtype=torch.int64, device=param.device)
        h_TD = model(ids_T, batch, cache)
        cached = len(tokens)
        token = int(model.compute_logits(h_TD[-1:]).argmax(dim=-1).item())
        tokens.append(token)
        out.append(token)
        if token in eos_token_ids:
            break
    return out

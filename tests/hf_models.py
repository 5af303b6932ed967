"""Tiny random models of every family, built with `transformers` itself and written by its own
`save_pretrained`: the correctness oracle for our loader, model code and engine.

Awkward sizes on purpose: experts not divisible by 2 or 3 workers, odd top-k, GQA groups > 1, a
dense layer among MoE layers (Qwen2-MoE), group-limited routing with a first dense layer
(DeepSeek-V3).
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")

_COMMON = dict(vocab_size=384, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, initializer_range=0.15, bos_token_id=1, eos_token_id=2,
               pad_token_id=0, tie_word_embeddings=False)


def hf_config(family: str, **overrides):
    import transformers

    if family == "mixtral":
        kw = dict(_COMMON, intermediate_size=40, num_hidden_layers=2, num_local_experts=7, num_experts_per_tok=3)
        cls = transformers.MixtralConfig
    elif family == "qwen2_moe":
        kw = dict(_COMMON, intermediate_size=56, moe_intermediate_size=24, num_hidden_layers=3, num_experts=9,
                  num_experts_per_tok=3, shared_expert_intermediate_size=40, mlp_only_layers=[1],
                  norm_topk_prob=False, qkv_bias=True)
        cls = transformers.Qwen2MoeConfig
    elif family == "qwen3_moe":
        kw = dict(_COMMON, intermediate_size=56, moe_intermediate_size=24, num_hidden_layers=2, num_experts=8,
                  num_experts_per_tok=3, norm_topk_prob=True, head_dim=16)
        cls = transformers.Qwen3MoeConfig
    elif family == "olmoe":
        kw = dict(_COMMON, intermediate_size=24, num_hidden_layers=2, num_experts=7, num_experts_per_tok=2,
                  norm_topk_prob=False)
        cls = transformers.OlmoeConfig
    elif family == "deepseek_v3":
        kw = dict(_COMMON, num_key_value_heads=4, intermediate_size=56, moe_intermediate_size=24, num_hidden_layers=3,
                  n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=4, topk_group=2,
                  first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16,
                  q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12)
        cls = transformers.DeepseekV3Config
    else:
        raise ValueError(f"unknown family {family!r}")
    kw.update(overrides)
    return cls(**kw)


def hf_checkpoint(family: str, directory: str | Path, seed: int = 0, **overrides):
    """(directory, the transformers model in fp32 eval mode), saved with save_pretrained."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides), dtype=torch.float32).eval()
    if family == "deepseek_v3":  # a non-zero selection bias, so the test sees it matter
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("e_score_correction_bias"):
                    param.copy_(0.05 * torch.randn(param.shape))
    directory = Path(directory)
    model.save_pretrained(directory)
    return str(directory), model


@torch.no_grad()
def hf_logits(model, ids: list[int]):
    return model(torch.tensor([ids])).logits[0].float().numpy()


@torch.no_grad()
def hf_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(ids):].tolist()

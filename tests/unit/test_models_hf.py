"""Our model families against transformers (the oracle), from checkpoints `save_pretrained` wrote.

For each family a tiny random model with awkward sizes (7 / 9 / 16 experts, top-3, GQA groups of 2
and 3, dense layers, shared experts, q/k norms, clip_qkv, tied embeddings, MLA with and without
q_lora_rank, both rope layouts) is built with transformers' own config class and saved; ours loads that directory.
  (a) logits of 3 prompts of different lengths prefilled together in one step equal transformers'
      for each prompt alone (max |ours - ref| / max |ref| <= 1e-4), via both attention paths;
  (b) greedy generation with our paged cache (prefill, then batched 1-token decode steps; one
      sequence joins late, so some steps mix a prefill with decodes) equals transformers'
      `generate(do_sample=False)` token for token;
  (c) the fused 3-D expert layout, written by `write_checkpoint`, loads to the same logits;
  (d) transformers loads what `write_checkpoint` writes (either layout) to the same logits.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from moeray.models.checkpoint import CheckpointReader, load_reference_model, write_checkpoint
from moeray.models.decoder import MoECausalLM
from moeray.models.kv_cache import AttentionBatch, SeqSpan

transformers.logging.set_verbosity_error()

PROMPT_LENGTHS = (9, 4, 14)
NEW_TOKENS = 32
COMMON = dict(vocab_size=256, max_position_embeddings=256, initializer_range=0.1, eos_token_id=None,
              bos_token_id=None, pad_token_id=0, tie_word_embeddings=False)


def _configs() -> dict[str, transformers.PretrainedConfig]:
    return {
        "mixtral": transformers.MixtralConfig(
            **COMMON, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, num_local_experts=7, num_experts_per_tok=3, rms_norm_eps=1e-5),
        "qwen2_moe": transformers.Qwen2MoeConfig(
            **COMMON, hidden_size=64, intermediate_size=72, moe_intermediate_size=24,
            shared_expert_intermediate_size=36, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            num_experts=9, num_experts_per_tok=3, mlp_only_layers=[1], norm_topk_prob=False, qkv_bias=True),
        "qwen3_moe": transformers.Qwen3MoeConfig(
            **COMMON, hidden_size=48, intermediate_size=56, moe_intermediate_size=20, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=10, num_experts=8, num_experts_per_tok=2,
            decoder_sparse_step=2, norm_topk_prob=True, attention_bias=True),
        "olmoe": transformers.OlmoeConfig(
            **{**COMMON, "tie_word_embeddings": True}, hidden_size=48, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts=9, num_experts_per_tok=3, clip_qkv=0.6),
        "deepseek_v3-q_lora": transformers.DeepseekV3Config(
            **COMMON, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=3, n_group=4,
            topk_group=2, first_k_dense_replace=1, n_shared_experts=2, q_lora_rank=24, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, routed_scaling_factor=2.5, norm_topk_prob=True,
            rope_interleave=True),
        "deepseek_v3-no_q_lora": transformers.DeepseekV3Config(
            **COMMON, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
            topk_group=1, first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=None, kv_lora_rank=12,
            qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=8, routed_scaling_factor=1.5,
            norm_topk_prob=False, rope_interleave=False),
    }


CASES = sorted(_configs())


@torch.no_grad()
def _randomise_(model: torch.nn.Module, seed: int) -> None:
    """Norm weights and biases away from their 1 / 0 init (so a mis-mapped one shows), and a
    DeepSeek selection bias large enough to change which experts are picked."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if name.endswith("norm.weight"):
            tensor.copy_(1.0 + 0.2 * torch.randn(tensor.shape, generator=gen))
        elif name.endswith(".bias") or name.endswith("e_score_correction_bias"):
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and spinning threads slow down badly on a shared host."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory):
    """(name, transformers model, its save_pretrained directory, our model loaded from it)."""
    name = request.param
    torch.manual_seed(CASES.index(name))
    ref = transformers.AutoModelForCausalLM.from_config(_configs()[name], dtype=torch.float32)
    _randomise_(ref, seed=100 + CASES.index(name))
    ref.eval()
    directory = tmp_path_factory.mktemp(name.replace("-", "_"))
    ref.save_pretrained(directory)
    ours = load_reference_model(directory)
    return name, ref, directory, ours


def _prompts(vocab: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in PROMPT_LENGTHS]


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _allocate_blocks(lengths: list[int], block_size: int) -> list[tuple[int, ...]]:
    """Interleaved block ids (sequence b gets blocks b, b + B, ...) so no table is contiguous."""
    need = [math.ceil(n / block_size) for n in lengths]
    tables: list[list[int]] = [[] for _ in lengths]
    next_id = 0
    for round_ in range(max(need)):
        for b, n in enumerate(need):
            if round_ < n:
                tables[b].append(next_id)
                next_id += 1
    return [tuple(t) for t in tables]


def prefill_logits(model: MoECausalLM, prompts: list[torch.Tensor], block_size: int, impl: str) -> list[torch.Tensor]:
    """All prompts prefilled together in one step -> each prompt's [n, V] logits."""
    tables = _allocate_blocks([len(p) for p in prompts], block_size)
    cache = model.new_cache(sum(len(t) for t in tables), block_size)
    batch = AttentionBatch.build([SeqSpan(t, 0, len(p)) for t, p in zip(tables, prompts)], block_size)
    logits_TV = model.compute_logits(model(torch.cat(prompts), batch, cache, attention_impl=impl))
    return [logits_TV[lo:hi] for lo, hi in zip(batch.query_start_B1[:-1], batch.query_start_B1[1:])]


def greedy_generate(model: MoECausalLM, prompts: list[torch.Tensor], new_tokens: int, block_size: int,
                    join_step: list[int], impl: str = "auto") -> list[list[int]]:
    """Greedy decoding with our cache: sequence b is prefilled at step join_step[b], then decodes one
    token per step, batched with the others (a step may mix one sequence's prefill with decodes)."""
    tables = _allocate_blocks([len(p) + new_tokens for p in prompts], block_size)
    cache = model.new_cache(sum(len(t) for t in tables), block_size)
    generated: list[list[int]] = [[] for _ in prompts]
    step = 0
    while any(len(g) < new_tokens for g in generated):
        spans, ids = [], []
        active = [b for b in range(len(prompts)) if join_step[b] <= step and len(generated[b]) < new_tokens]
        for b in active:
            if not generated[b]:  # prefill
                spans.append(SeqSpan(tables[b], 0, len(prompts[b])))
                ids.append(prompts[b])
            else:
                spans.append(SeqSpan(tables[b], len(prompts[b]) + len(generated[b]) - 1, 1))
                ids.append(torch.tensor(generated[b][-1:]))
        batch = AttentionBatch.build(spans, block_size)
        ids_T = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
        h_TD = model(ids_T, batch, cache, attention_impl=impl)
        next_B = model.compute_logits(h_TD[batch.last_row_B]).argmax(-1).tolist() if active else []
        for b, token in zip(active, next_B):
            generated[b].append(int(token))
        step += 1
    return generated


@pytest.mark.parametrize("impl", ["reference", "batched"])
def test_prefill_logits_match_transformers(case, impl):
    name, ref, _, ours = case
    prompts = _prompts(ours.cfg.vocab_size)
    got = prefill_logits(ours, prompts, block_size=4, impl=impl)
    with torch.no_grad():
        for prompt, logits in zip(prompts, got):
            want = ref(prompt[None]).logits[0]
            assert _rel_error(logits, want) <= 1e-4, (name, impl, len(prompt))


def test_greedy_generation_matches_transformers(case):
    name, ref, _, ours = case
    prompts = _prompts(ours.cfg.vocab_size, seed=1)
    got = greedy_generate(ours, prompts, NEW_TOKENS, block_size=3, join_step=[0, 0, 2])
    for prompt, tokens in zip(prompts, got):
        with torch.no_grad():
            out = ref.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
                               do_sample=False, max_new_tokens=NEW_TOKENS)
        want = out[0, len(prompt):].tolist()
        assert len(want) == NEW_TOKENS, "transformers stopped early (no eos is configured)"
        assert tokens == want, (name, len(prompt))
    assert len({tuple(t) for t in got}) == len(got), "the three sequences must not all generate the same text"


def test_greedy_generation_paths_agree(case):
    """The reference attention loop drives the same generation as the default (batched) path."""
    _, _, _, ours = case
    prompts = _prompts(ours.cfg.vocab_size, seed=2)
    fast = greedy_generate(ours, prompts, 8, block_size=1, join_step=[0, 1, 3])
    slow = greedy_generate(ours, prompts, 8, block_size=1, join_step=[0, 1, 3], impl="reference")
    assert fast == slow


def test_fused_layout_loads_to_the_same_logits(case, tmp_path):
    name, ref, _, ours = case
    write_checkpoint(ours, tmp_path / "fused", layout="fused")
    reader = CheckpointReader(tmp_path / "fused")
    assert reader.layout == "fused"
    assert any(n.endswith("experts.gate_up_proj") for n in reader.tensors)
    assert not any(".experts.0." in n for n in reader.tensors)
    fused = load_reference_model(tmp_path / "fused")
    prompts = _prompts(ours.cfg.vocab_size, seed=3)
    for a, b in zip(prefill_logits(fused, prompts, 4, "auto"), prefill_logits(ours, prompts, 4, "auto")):
        assert torch.equal(a, b), name
    with torch.no_grad():
        want = ref(prompts[0][None]).logits[0]
    assert _rel_error(prefill_logits(fused, prompts[:1], 4, "auto")[0], want) <= 1e-4


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_transformers_loads_what_we_write(case, tmp_path, layout):
    name, ref, _, ours = case
    write_checkpoint(ours, tmp_path / "ours", layout=layout)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(reloaded) is type(ref)
    prompt = _prompts(ours.cfg.vocab_size, seed=4)[2]
    with torch.no_grad():
        assert _rel_error(reloaded(prompt[None]).logits, ref(prompt[None]).logits) <= 1e-6, name

"""Per-phase GPU time of one decode step, in this process, on the worker's own model and runner.

A `Worker` (a plain class; no Ray actor here) is built for one GPU, `batch` sequences are prefilled
to `context` tokens, then one decode step is timed with CUDA events around each phase (medians
over repeats). Phases: the host building the step's attention batch (wall clock), attention,
norms and residuals, router + slot map, dispatch + expert kernel, combine, shared expert, LM head,
sampling.

Legend: B sequences, T tokens, D hidden, V vocab.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from moeray.bench.phases import PhaseTimer


def _hook_phases(model, timer: PhaseTimer) -> list:
    handles = []
    for layer in model.layers:
        handles.append(layer.self_attn.register_forward_pre_hook(lambda *_: timer.mark("norms+residual")))
        handles.append(layer.self_attn.register_forward_hook(lambda *_: timer.mark("attention")))
        handles.append(layer.mlp.register_forward_pre_hook(lambda *_: timer.mark("norms+residual")))
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts.timer = timer  # marks "route", "experts", "combine"
            handles.append(layer.mlp.register_forward_hook(lambda *_: timer.mark("shared expert")))
        else:
            handles.append(layer.mlp.register_forward_hook(lambda *_: timer.mark("dense mlp")))
    return handles


def _one_gpu_worker(directory: str, max_batch: int, tokens_per_seq: int, prompt_len: int):
    """An in-process Worker (no Ray) holding the whole model on the GPU, statistics off, with KV
    room for max_batch sequences of tokens_per_seq and a prefill budget of max_batch prompts."""
    from moeray.config import EngineOptions
    from moeray.llm import engine_config_for
    from moeray.worker import Worker
    from placement import Placement

    options = EngineOptions(parallel={"device": "cuda"}, rebalance={"enabled": False}, stats={"enabled": False},
                            cache={"block_size": 16, "kv_tokens_per_worker": max_batch * tokens_per_seq + 64,
                                   "max_num_seqs": max_batch, "max_num_batched_tokens": max_batch * prompt_len})
    config = engine_config_for(directory, options)
    cfg = config.model
    placement = Placement.contiguous(cfg.num_moe_layers, cfg.num_experts, 1, config.slots_per_worker)
    return Worker(0, config, directory, placement)


@torch.no_grad()
def decode_phases(directory: str, batches: list[int], context: int, seed: int = 0, repeats: int = 20
                  ) -> dict[int, dict[str, float]]:
    """{batch: {phase: median ms}} for each batch size, on one worker built once."""
    worker = _one_gpu_worker(directory, max(batches), context + repeats + 24, context)
    config, runner = worker.config, worker.runner
    cfg = config.model
    rng = np.random.default_rng(seed)
    results = {}
    for batch in batches:
        results[batch] = _phases_at(runner, cfg, config.cache.block_size, batch, context, repeats, rng)
    del worker, runner
    torch.cuda.empty_cache()
    return results


def _timed_step(runner, timer: PhaseTimer) -> tuple[dict[str, float], list[int]]:
    """One eager forward of every sequence the runner holds (their uncached tokens), phase-timed;
    returns (phases ms, sampled tokens). Leaves the tokens cached."""
    from moeray.models.kv_cache import AttentionBatch, SeqSpan

    seqs = list(runner.sequences.values())
    host_start = time.perf_counter()
    spans = [SeqSpan(tuple(s.block_ids), s.num_cached, len(s.tokens) - s.num_cached) for s in seqs]
    attn_batch = AttentionBatch.build(spans, runner.cache.block_size, runner.device)
    ids_T = torch.tensor([t for s in seqs for t in s.tokens[s.num_cached:]], dtype=torch.int64, device=runner.device)
    host_ms = 1e3 * (time.perf_counter() - host_start)
    torch.cuda.synchronize()
    timer.start()
    h_TD = runner.model(ids_T, attn_batch, runner.cache)
    timer.mark("norms+residual")
    logits_BV = runner.model.compute_logits(h_TD.index_select(0, attn_batch.last_row_B))
    timer.mark("lm head")
    tokens, _ = runner.sampler.sample(logits_BV, [s.params for s in seqs], [s.generator for s in seqs])
    timer.mark("sampling")
    phases = timer.phases_ms()
    phases["host: build batch"] = host_ms
    for s in seqs:
        s.num_cached = len(s.tokens)
    return phases, tokens


def _medians(samples: list[dict[str, float]]) -> dict[str, float]:
    out = {k: float(np.median([s.get(k, 0.0) for s in samples])) for k in samples[0]}
    out["total (GPU events)"] = float(np.median([sum(v for k, v in s.items() if not k.startswith("host")) for s in samples]))
    return out


def _with_hooks(runner, fn):
    timer = PhaseTimer()
    handles = _hook_phases(runner.model, timer)
    try:
        return fn(timer)
    finally:
        for h in handles:
            h.remove()
        for layer in runner.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.experts.timer = None


def _new_sequences(cfg, block_size: int, batch: int, prompt_len: int, extra: int, rng):
    from moeray.generation.messages import NewSequence
    from moeray.generation.sampling import SamplingParams

    params = SamplingParams(max_tokens=extra + 8, temperature=0.0, ignore_eos=True)
    blocks = -(-(prompt_len + extra + 8) // block_size)
    return tuple(NewSequence(f"s{b}", tuple(rng.integers(3, cfg.vocab_size, prompt_len).tolist()), params, blocks)
                 for b in range(batch))


def _phases_at(runner, cfg, block_size: int, batch: int, context: int, repeats: int, rng) -> dict[str, float]:
    from moeray.generation.messages import StepPlan

    runner.reset()
    runner.step(StepPlan(new=_new_sequences(cfg, block_size, batch, context - 1, repeats, rng)))  # prefill

    def decode(timer):
        samples = []
        for _ in range(repeats + 3):
            phases, tokens = _timed_step(runner, timer)
            samples.append(phases)
            for s, token in zip(runner.sequences.values(), tokens):
                s.tokens.append(token)
        return samples[3:]  # warm-up

    return _medians(_with_hooks(runner, decode))


@torch.no_grad()
def prefill_phases(directory: str, batches: list[int], prompt_len: int, seed: int = 0, repeats: int = 5
                   ) -> dict[int, dict[str, float]]:
    """{batch: {phase: median ms}} of one eager prefill step of `batch` prompts of prompt_len tokens."""
    worker = _one_gpu_worker(directory, max(batches), prompt_len + 24, prompt_len)
    config, runner = worker.config, worker.runner
    cfg = config.model
    rng = np.random.default_rng(seed)
    results = {}
    for batch in batches:
        def prefill(timer):
            samples = []
            for _ in range(repeats + 2):
                runner.reset()
                for new in _new_sequences(cfg, config.cache.block_size, batch, prompt_len, 0, rng):
                    runner._admit(new)
                samples.append(_timed_step(runner, timer)[0])
            return samples[2:]  # warm-up

        results[batch] = _medians(_with_hooks(runner, prefill))
    del worker, runner
    torch.cuda.empty_cache()
    return results

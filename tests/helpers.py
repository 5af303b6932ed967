"""Small builders shared by the tests: tiny random checkpoints and valid placements."""

from __future__ import annotations

import numpy as np
import torch

from moeray.config import ModelConfig
from moeray.generation.driver import GenerationDriver
from moeray.models.checkpoint import load_reference_model
from moeray.models.decoder import MoECausalLM
from moeray.models.kv_cache import AttentionBatch, PagedKVCache, SeqSpan
from moeray.models.tiny import write_tiny_model
from placement import Placement


def make_checkpoint(tmp_path, seed: int = 0, family: str = "qwen3_moe", **model_overrides
                    ) -> tuple[str, ModelConfig, MoECausalLM]:
    """The built-in tiny model of `family` written by our own HF writer, and its reference."""
    path = tmp_path / f"ckpt-{family}-{seed}-{abs(hash(repr(sorted(model_overrides.items())))) % 10**8}"
    path, cfg = write_tiny_model(path, family=family, seed=seed, **model_overrides)
    return str(path), cfg, load_reference_model(path)


@torch.no_grad()
def reference_logits(model: MoECausalLM, ids_T) -> np.ndarray:
    """[T, V] logits of one prompt through the single-process reference (its own cache)."""
    param = next(model.parameters())
    ids = torch.as_tensor(np.asarray(ids_T, dtype=np.int64), device=param.device)
    cfg = model.cfg
    heads, k_dim, v_dim = cfg.kv_cache_spec
    cache = PagedKVCache(cfg.num_hidden_layers, len(ids), 1, heads, k_dim, v_dim, param.dtype, param.device)
    batch = AttentionBatch.build([SeqSpan(tuple(range(len(ids))), 0, len(ids))], 1, param.device)
    return model.compute_logits(model(ids, batch, cache)).cpu().numpy()


def engine_logits(engine, prompts) -> list[np.ndarray]:
    """[T, V] logits of each prompt through the engine (scoring requests, one step)."""
    return GenerationDriver(engine).prompt_logits([np.asarray(p, dtype=np.int64).tolist() for p in prompts])


def max_rel_error(got: np.ndarray, want: np.ndarray) -> float:
    scale = max(float(np.abs(want).max()), 1e-30)
    return float(np.abs(got - want).max()) / scale


def random_replicated_placement(num_layers, num_experts, num_workers, slots_per_worker, seed=0) -> Placement:
    """Every expert once (shuffled), then free slots filled with extra replicas, never two copies
    of one expert on one worker, different in every layer."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_layers):
        row = np.full(num_workers * slots_per_worker, -1, dtype=np.int64)
        slots = rng.permutation(len(row))[:num_experts]
        row[slots] = rng.permutation(num_experts)
        for slot in np.nonzero(row < 0)[0]:
            w = slot // slots_per_worker
            held = set(row[w * slots_per_worker:(w + 1) * slots_per_worker].tolist())
            choices = [e for e in range(num_experts) if e not in held]
            if choices:
                row[slot] = rng.choice(choices)
        rows.append(row)
    return Placement(np.stack(rows), num_experts, slots_per_worker).validate()


def results_from_triton_interpreter(script: str) -> dict:
    """Run `script` (a test module whose __main__ prints one JSON line) under TRITON_INTERPRET=1 in
    a subprocess: the flag must be set before triton compiles anything, and setting it in this
    process would leak into GPU tests of the same session."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    pytest.importorskip("triton")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, script], env=env, cwd=repo, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decode_run(worker, prompts, steps, before_step=None):
    """Greedy decoding of `prompts` on an in-process Worker, step by step, returning
    ({request: [(token, logprob)]}, load counts). Sequences stop at different lengths (the batch
    shrinks across graph buckets) and the last prompt joins mid-way (an eager prefill between
    decode-only steps): the awkward cases for captured / padded decode steps. `before_step(worker,
    step)` runs before each step (e.g. to drop the captured graphs mid-run, as a commit does)."""
    from moeray.generation.messages import NewSequence, StepPlan
    from moeray.generation.sampling import SamplingParams

    def new(i, p):
        params = SamplingParams(max_tokens=steps + 1 - (i % 5), temperature=0.0, ignore_eos=True, logprobs=3)
        return NewSequence(f"r{i}", tuple(p), params, -(-(len(p) + steps + 1) // 4))

    outs = {f"r{i}": [] for i in range(len(prompts))}
    late = len(prompts) - 1 if len(prompts) > 1 else None
    plan = StepPlan(new=tuple(new(i, p) for i, p in enumerate(prompts) if i != late))
    for step in range(steps + 6):
        if step == 4 and late is not None:
            plan = StepPlan(new=(new(late, prompts[late]),))
        if before_step is not None:
            before_step(worker, step)
        for u in worker.step(plan).updates:
            outs[u.request_id].append((u.token_ids[0], u.logprobs[0].logprob))
        plan = StepPlan()
    return outs, worker.load_counts()


def single_worker(ckpt: str, device: str = "cpu", cuda_graphs: bool = False):
    """An in-process Worker (no Ray) on one device: the whole model, block size 4."""
    from moeray.config import EngineOptions
    from moeray.llm import engine_config_for
    from moeray.worker import Worker

    config = engine_config_for(ckpt, EngineOptions(
        parallel={"device": device, "cuda_graphs": cuda_graphs}, rebalance={"enabled": False},
        cache={"block_size": 4, "kv_tokens_per_worker": 4096, "max_num_seqs": 32}))
    cfg = config.model
    placement = Placement.contiguous(cfg.num_moe_layers, cfg.num_experts, 1, config.slots_per_worker)
    return Worker(0, config, ckpt, placement)


def random_sharded_placement(num_layers, num_experts, num_workers, slots_per_worker, seed=0,
                             weighted=False) -> Placement:
    """`random_replicated_placement`, then each expert's slots (ascending) cut into runs: whole
    replicas and replicas of 2 or 3 shards (on distinct workers: no worker holds an expert twice)
    with uneven widths in 1/16ths (exact binary fractions). `weighted`: random planned split
    weights, the same on every shard of a replica."""
    base = random_replicated_placement(num_layers, num_experts, num_workers, slots_per_worker, seed)
    rng = np.random.default_rng(seed + 1000)
    width_LS = (base.phy2log >= 0).astype(np.float64)
    weights_LS = np.zeros_like(width_LS)
    for layer in range(num_layers):
        for expert in range(num_experts):
            slots = np.flatnonzero(base.phy2log[layer] == expert)
            runs, i = [], 0
            while i < len(slots):
                k = int(rng.choice([1, 2, 3])) if len(slots) - i >= 2 else 1
                k = min(k, len(slots) - i)
                runs.append(slots[i:i + k])
                i += k
            shares = rng.random(len(runs)) + 0.2
            shares /= shares.sum()
            for run, share in zip(runs, shares):
                if len(run) > 1:
                    cuts = np.sort(rng.choice(np.arange(1, 16), size=len(run) - 1, replace=False))
                    width_LS[layer, run] = np.diff(np.r_[0, cuts, 16]) / 16.0
                weights_LS[layer, run] = share
    return Placement(base.phy2log, num_experts, slots_per_worker, shard_width=width_LS,
                     replica_weights=weights_LS if weighted else None).validate()

"""Captured decode steps (moeray/generation/cuda_graphs.py) equal the eager steps: the same greedy
tokens and logits, and the same expert load counted (padding rows never count), at batch sizes
that pad (1, 3, 17) and with sequences crossing block-bucket boundaries. One GPU, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import make_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _worker(ckpt, graphs: bool):
    from moeray.config import EngineOptions
    from moeray.llm import engine_config_for
    from moeray.worker import Worker
    from placement import Placement

    config = engine_config_for(ckpt, EngineOptions(
        parallel={"device": "cuda", "cuda_graphs": graphs}, rebalance={"enabled": False},
        cache={"block_size": 4, "kv_tokens_per_worker": 4096, "max_num_seqs": 32}))
    cfg = config.model
    placement = Placement.contiguous(cfg.num_moe_layers, cfg.num_experts, 1, config.slots_per_worker)
    return Worker(0, config, ckpt, placement.phy2log)


def _run(worker, prompts, steps):
    """Sequences stop at different lengths (the batch shrinks across buckets) and the last prompt
    joins mid-way (an eager prefill between captured steps)."""
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
        for u in worker.step(plan).updates:
            outs[u.request_id].append((u.token_ids[0], u.logprobs[0].logprob))
        plan = StepPlan()
    return outs, worker.load_counts()


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_graph_decode_equals_eager(tmp_path, batch):
    ckpt, cfg, _ = make_checkpoint(tmp_path, family="mixtral", num_experts=6, top_k=3)
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(3, cfg.vocab_size, int(n)).tolist() for n in rng.integers(1, 14, batch)]
    eager, eager_load = _run(_worker(ckpt, graphs=False), prompts, steps=12)
    graph_worker = _worker(ckpt, graphs=True)
    graphed, graphed_load = _run(graph_worker, prompts, steps=12)
    assert graph_worker.runner.graphs.replays >= 8
    if batch > 1:
        assert len(graph_worker.runner.graphs.graphs) >= 2  # the batch shrank across buckets
    for rid in eager:
        assert [t for t, _ in graphed[rid]] == [t for t, _ in eager[rid]], rid
        np.testing.assert_allclose([lp for _, lp in graphed[rid]], [lp for _, lp in eager[rid]], atol=2e-4)
    assert np.array_equal(graphed_load, eager_load)

"""The padded static-shape decode step of moeray/generation/cuda_graphs.py, run eagerly on the CPU
(no graph capture here): the same tokens, logprobs and expert load as the plain step, at batch
sizes that pad (1, 3, 17) and with contexts crossing block-bucket boundaries. The GPU test
(tests/gpu/test_cuda_graphs.py) checks the captured replays the same way."""

from __future__ import annotations

import numpy as np
import pytest

from moeray.generation.cuda_graphs import CudaGraphDecoder, block_bucket, bucket
from tests.helpers import make_checkpoint


def _worker(ckpt, padded: bool):
    from moeray.config import EngineOptions
    from moeray.llm import engine_config_for
    from moeray.worker import Worker
    from placement import Placement

    config = engine_config_for(ckpt, EngineOptions(rebalance={"enabled": False},
                                                   cache={"block_size": 4, "kv_tokens_per_worker": 512, "max_num_seqs": 32}))
    cfg = config.model
    placement = Placement.contiguous(cfg.num_moe_layers, cfg.num_experts, 1, config.slots_per_worker)
    worker = Worker(0, config, ckpt, placement.phy2log)
    if padded:
        runner = worker.runner
        runner.graphs = CudaGraphDecoder(runner.model, runner.cache, runner.cache.num_blocks - 1, max_batch=32)
    return worker


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


def test_buckets():
    assert [bucket(n, (1, 2, 4, 8)) for n in (1, 3, 8, 9)] == [1, 4, 8, None]
    assert [block_bucket(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_padded_decode_equals_the_plain_step(tmp_path, batch):
    ckpt, cfg, _ = make_checkpoint(tmp_path, family="mixtral", num_experts=6, top_k=3)
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(3, cfg.vocab_size, int(n)).tolist() for n in rng.integers(2, 14, batch)]
    plain, plain_load = _run(_worker(ckpt, padded=False), prompts, steps=12)
    worker = _worker(ckpt, padded=True)
    padded, padded_load = _run(worker, prompts, steps=12)
    assert worker.runner.graphs.replays >= 8
    if batch > 1:
        assert len(worker.runner.graphs.graphs) >= 2  # the batch shrank across buckets
    for rid in plain:
        assert [t for t, _ in padded[rid]] == [t for t, _ in plain[rid]], rid
        np.testing.assert_allclose([lp for _, lp in padded[rid]], [lp for _, lp in plain[rid]], atol=1e-4)
    assert np.array_equal(padded_load, plain_load)  # padding rows are never counted

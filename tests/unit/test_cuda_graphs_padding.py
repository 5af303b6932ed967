"""The padded static-shape decode step of moeray/generation/cuda_graphs.py, run eagerly on the CPU
(no graph capture here): the same tokens, logprobs and expert load as the plain step, at batch
sizes that pad (1, 3, 17) and with contexts crossing block-bucket boundaries. The GPU test
(tests/gpu/test_cuda_graphs.py) checks the captured replays the same way."""

from __future__ import annotations

import numpy as np
import pytest

from moeray.generation.cuda_graphs import CudaGraphDecoder, block_bucket, bucket
from tests.helpers import decode_run, make_checkpoint, single_worker


def _worker(ckpt, padded: bool):
    worker = single_worker(ckpt)
    if padded:  # the decoder captures nothing on a CPU: it runs the padded step eagerly
        runner = worker.runner
        runner.graphs = CudaGraphDecoder(runner.model, runner.cache, runner.cache.num_blocks - 1, max_batch=32)
    return worker


def test_buckets():
    assert [bucket(n, (1, 2, 4, 8)) for n in (1, 3, 8, 9)] == [1, 4, 8, None]
    assert [block_bucket(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_padded_decode_equals_the_plain_step(tmp_path, batch):
    ckpt, cfg, _ = make_checkpoint(tmp_path, family="mixtral", num_experts=6, top_k=3)
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(3, cfg.vocab_size, int(n)).tolist() for n in rng.integers(2, 14, batch)]
    plain, plain_load = decode_run(_worker(ckpt, padded=False), prompts, steps=12)
    worker = _worker(ckpt, padded=True)
    padded, padded_load = decode_run(worker, prompts, steps=12)
    assert worker.runner.graphs.replays >= 8
    if batch > 1:
        assert len(worker.runner.graphs.graphs) >= 2  # the batch shrank across buckets
    for rid in plain:
        assert [t for t, _ in padded[rid]] == [t for t, _ in plain[rid]], rid
        np.testing.assert_allclose([lp for _, lp in padded[rid]], [lp for _, lp in plain[rid]], atol=1e-4)
    assert np.array_equal(padded_load, plain_load)  # padding rows are never counted

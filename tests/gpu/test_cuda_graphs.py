"""Captured decode steps (moeray/generation/cuda_graphs.py) equal the eager steps: the same greedy
tokens and logits, and the same expert load counted (padding rows never count), at batch sizes
that pad (1, 3, 17) and with sequences crossing block-bucket boundaries. One GPU, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import decode_run, make_checkpoint, single_worker

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_graph_decode_equals_eager(tmp_path, batch):
    ckpt, cfg, _ = make_checkpoint(tmp_path, family="mixtral", num_experts=6, top_k=3)
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(3, cfg.vocab_size, int(n)).tolist() for n in rng.integers(1, 14, batch)]
    eager, eager_load = decode_run(single_worker(ckpt, "cuda", cuda_graphs=False), prompts, steps=12)
    graph_worker = single_worker(ckpt, "cuda", cuda_graphs=True)
    graphed, graphed_load = decode_run(graph_worker, prompts, steps=12)
    assert graph_worker.runner.graphs.replays >= 8
    if batch > 1:
        assert len(graph_worker.runner.graphs.graphs) >= 2  # the batch shrank across buckets
    for rid in eager:
        assert [t for t, _ in graphed[rid]] == [t for t, _ in eager[rid]], rid
        np.testing.assert_allclose([lp for _, lp in graphed[rid]], [lp for _, lp in eager[rid]], atol=2e-4)
    assert np.array_equal(graphed_load, eager_load)

"""The engine on a local Ray cluster (CPU workers, Gloo) equals the single-process reference.

fp32, max relative error <= 1e-5, across worker counts, top-k, experts not divisible by workers,
T = 1, idle workers, replicated placements and every routing family.
"""

import numpy as np
import pytest

from moeray.config import EngineConfig, ParallelConfig
from moeray.engine import Engine
from tests.helpers import make_checkpoint, max_rel_error, random_replicated_placement, reference_logits

CASES = {
    # id: (model overrides, workers, redundant slots per worker, replicated placement?[, overlap chunks])
    "1w-k2": (dict(num_experts=8, top_k=2), 1, 0, False),
    "2w-k1": (dict(num_experts=8, top_k=1), 2, 0, False),
    "3w-E7-not-divisible": (dict(num_experts=7, top_k=2), 3, 0, False),
    "4w-k8-sigmoid-groups-shared": (
        dict(num_experts=8, top_k=8, scoring="sigmoid", n_group=4, topk_group=4, selection_bias=True,
             routed_scaling_factor=2.5, shared_expert_intermediate_size=32, shared_expert_gate=True),
        4, 0, False),
    "4w-replicas": (dict(num_experts=6, top_k=2, num_layers=3), 4, 1, True),
    "3w-replicas-overlapped": (dict(num_experts=7, top_k=3, num_layers=2), 3, 1, True, 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_equals_reference(case, ray_cluster, tmp_path):
    overrides, workers, redundant, replicated, *overlap = CASES[case]
    ckpt, model_cfg, reference = make_checkpoint(tmp_path, seed=3, **overrides)
    config = EngineConfig(model=model_cfg, parallel=ParallelConfig(
        num_workers=workers, redundant_slots_per_worker=redundant, collective_timeout_s=30,
        overlap_chunks=overlap[0] if overlap else 1))
    placement = None
    if replicated:
        placement = random_replicated_placement(model_cfg.num_layers, model_cfg.num_experts, workers,
                                                config.slots_per_worker, seed=7)
        assert placement.logcnt.max() > 1, "the case must exercise replicas"
    rng = np.random.default_rng(0)
    with Engine(config, ckpt, placement) as engine:
        for num_tokens in (37, 1, workers - 1, 0):  # uneven shares, T=1, an idle worker, all idle
            ids = rng.integers(0, model_cfg.vocab_size, num_tokens)
            got = engine.step(ids)
            assert got.shape == (num_tokens, model_cfg.vocab_size)
            if num_tokens:
                err = max_rel_error(got, reference_logits(reference, ids))
                assert err <= 1e-5, f"{case}, T={num_tokens}: max relative error {err:.2e}"
        load = engine.load()
        assert load.shape == (model_cfg.num_layers, model_cfg.num_experts)
        assert load.sum() == model_cfg.num_layers * model_cfg.top_k * (37 + 1 + max(workers - 1, 0))


def test_out_of_vocabulary_token_is_rejected_and_engine_keeps_serving(ray_cluster, tmp_path):
    ckpt, model_cfg, reference = make_checkpoint(tmp_path, seed=1)
    config = EngineConfig(model=model_cfg, parallel=ParallelConfig(num_workers=2))
    with Engine(config, ckpt) as engine:
        with pytest.raises(ValueError, match=r"token id 512 is outside the vocabulary \[0, 512\)"):
            engine.step([1, 512])
        ids = np.array([3, 4, 5])
        assert max_rel_error(engine.step(ids), reference_logits(reference, ids)) <= 1e-5

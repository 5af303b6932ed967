"""Random checkpoints written shard by shard load through the normal reader and are deterministic."""

import numpy as np
import torch

from moeray.config import tiny_model_config
from moeray.models.checkpoint import CheckpointReader, check_checkpoint, load_reference_model
from moeray.models.random_weights import write_random_checkpoint


def test_random_checkpoint_is_valid_sharded_and_deterministic(tmp_path):
    cfg = tiny_model_config("mixtral", num_experts=5, top_k=2)
    a = write_random_checkpoint(cfg, tmp_path / "a", seed=3, max_shard_bytes=200_000)
    b = write_random_checkpoint(cfg, tmp_path / "b", seed=3, max_shard_bytes=10**9)
    assert len(list(a.glob("*.safetensors"))) > 1 and (a / "model.safetensors.index.json").exists()
    assert check_checkpoint(a, cfg) == cfg
    w_a = CheckpointReader(a).read_expert_slots(1, np.array([4, -1, 0]), torch.float32)
    w_b = CheckpointReader(b).read_expert_slots(1, np.array([4, -1, 0]), torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(w_a, w_b))
    assert not torch.equal(w_a[0][0], w_a[0][2]) and torch.count_nonzero(w_a[0][1]) == 0
    other = write_random_checkpoint(cfg, tmp_path / "c", seed=4)
    assert not torch.equal(CheckpointReader(other).read_expert_slots(1, np.array([4]), torch.float32)[0], w_a[0][:1])
    model = load_reference_model(a)  # loads whole and gives O(1) logits
    from moeray.models.kv_cache import AttentionBatch, SeqSpan

    ids = torch.tensor([3, 4, 5])
    cache = model.new_cache(1, 8)
    logits = model.compute_logits(model(ids, AttentionBatch.build([SeqSpan((0,), 0, 3)], 8), cache))
    assert torch.isfinite(logits).all() and 0.1 < logits.std() < 100

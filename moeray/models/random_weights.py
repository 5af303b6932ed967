"""Random checkpoints of any size, written shard by shard: benchmarks need models (a Mixtral-shaped
4-layer model has 11 GB of experts) that do not fit being built in memory first and have no
published weights here. The scaling is `decoder.init_random_`'s: activations, attention scores and
router logits stay O(1).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from moeray.config import ModelConfig
from moeray.models.checkpoint import expected_tensors, write_tensors


def write_random_checkpoint(cfg: ModelConfig, directory: str | Path, seed: int = 0, layout: str = "per_expert",
                            max_shard_bytes: int = 2 << 30, device: str = "cpu") -> Path:
    """An HF checkpoint of `cfg` with deterministic random weights (per tensor name and seed),
    generated on `device` (a GPU makes the 11 GB case fast) and stored in cfg.dtype."""
    dtype = getattr(torch, cfg.dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    names = expected_tensors(cfg, layout)

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator(device).manual_seed(seed * 1_000_003 + names_index[name])
        noise = torch.randn(shape, generator=gen, device=device)
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith(".bias") or name.endswith("e_score_correction_bias"):
            value = 0.1 * noise
        elif name.endswith("embed_tokens.weight"):
            value = noise
        else:
            value = noise / math.sqrt(shape[-1])  # fan-in scaling
        return value.to(dtype).cpu()

    names_index = {name: i for i, (name, _) in enumerate(names)}
    return write_tensors(directory, cfg, [(n, s, itemsize) for n, s in names], make, max_shard_bytes)

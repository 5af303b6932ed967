"""The built-in tiny model: a small model of a real family with random weights, written in HF
format (config.json, model.safetensors, tokenizer.json) by our own code, so `moeray demo`, the
README's first command and the tests load it through the same code as a downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from moeray.config import ModelConfig, tiny_model_config
from moeray.generation.tokenizer import write_tiny_tokenizer
from moeray.models.checkpoint import init_random_, write_checkpoint
from moeray.models.decoder import MoECausalLM


def write_tiny_model(directory: str | Path, family: str = "qwen3_moe", seed: int = 0, layout: str = "per_expert",
                     **overrides) -> tuple[Path, ModelConfig]:
    """Write a random tiny model of `family` (+ a byte-level BPE tokenizer of its vocabulary)."""
    overrides = {"bos_token_id": 1, "eos_token_ids": (2,), **overrides}  # the tiny tokenizer's <s> and </s>
    cfg = tiny_model_config(family=family, **overrides)
    directory = write_checkpoint(init_random_(MoECausalLM(cfg), seed), directory, layout=layout)
    write_tiny_tokenizer(directory, cfg.vocab_size)
    return Path(directory), cfg

"""Checkpoints: exact round trip, per-slot reads, and errors that name the bad tensor."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moeray.errors import CheckpointError
from moeray.models.checkpoint import WEIGHTS_FILE, CheckpointReader
from tests.helpers import make_checkpoint


def test_round_trip_is_exact(tmp_path):
    ckpt, cfg, reference = make_checkpoint(tmp_path, shared_expert_intermediate_size=16, shared_expert_gate=True)
    reader = CheckpointReader(ckpt)
    w13, w2 = reader.read_expert_slots(1, np.array([5, -1, 0]), torch.float32)
    experts = reference.layers[1].experts
    assert torch.equal(w13[0], experts.w13_EHD[5]) and torch.equal(w2[2], experts.w2_EDF[0])
    assert not w13[1].any() and not w2[1].any(), "a free slot is zero"


def test_missing_expert_tensor_is_named(tmp_path):
    ckpt, _, _ = make_checkpoint(tmp_path)
    tensors = load_file(f"{ckpt}/{WEIGHTS_FILE}")
    del tensors["layers.1.experts.3.up_proj.weight"]
    save_file(tensors, f"{ckpt}/{WEIGHTS_FILE}")
    reader = CheckpointReader(ckpt)
    reader.read_expert_slots(1, np.array([2]), torch.float32)  # other experts still load
    with pytest.raises(CheckpointError, match=r"'layers.1.experts.3.up_proj.weight' is missing \(expected shape \[96, 64\]\)"):
        reader.read_expert_slots(1, np.array([3]), torch.float32)


def test_misshaped_tensor_is_named_with_both_shapes(tmp_path):
    ckpt, _, _ = make_checkpoint(tmp_path)
    tensors = load_file(f"{ckpt}/{WEIGHTS_FILE}")
    tensors["layers.0.router.weight"] = torch.zeros(7, 64)
    save_file(tensors, f"{ckpt}/{WEIGHTS_FILE}")
    with pytest.raises(CheckpointError, match=r"'layers.0.router.weight' has shape \[7, 64\], expected \[8, 64\]"):
        from moeray.models.checkpoint import load_reference_model

        load_reference_model(ckpt)


def test_directory_without_weights_is_rejected(tmp_path):
    ckpt, _, _ = make_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(open(f"{ckpt}/config.json").read())
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        CheckpointReader(tmp_path / "empty")

"""Checkpoints in Hugging Face format: exact round trips (single file, sharded, fused), per-slot
reads, header-only validation, and errors that name the tensor, the file and both shapes."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from moeray.config import FAMILIES, tiny_model_config
from moeray.errors import CheckpointError
from moeray.models.checkpoint import (CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, CheckpointReader, check_checkpoint,
                                      load_reference_model, read_safetensors_header, write_checkpoint)
from moeray.models.decoder import MoECausalLM, init_random_
from moeray.models.kv_cache import AttentionBatch, SeqSpan
from moeray.models.registry import adapter_for_family, supported_architectures


def make(tmp_path, family="qwen3_moe", seed=0, layout="per_expert", max_shard_bytes=None, **overrides):
    cfg = tiny_model_config(family, **overrides)
    model = init_random_(MoECausalLM(cfg), seed)
    directory = write_checkpoint(model, tmp_path / f"{family}-{layout}-{seed}", layout, max_shard_bytes)
    return directory, model


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_round_trip_is_exact(tmp_path, family, layout):
    directory, model = make(tmp_path, family, layout=layout)
    assert check_checkpoint(directory, expected=model.cfg) == model.cfg
    assert_same_parameters(load_reference_model(directory), model)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_read_expert_slots_in_slot_order_with_free_slots(tmp_path, layout):
    # Layer 0 dense: MoE layer 1 is decoder layer 2, MoE layer 0 is decoder layer 1.
    directory, model = make(tmp_path, "qwen2_moe", layout=layout, num_hidden_layers=3, dense_layer_indices=(0,))
    reader = CheckpointReader(directory)
    assert reader.layout == layout
    w13_SHD, w2_SDF = reader.read_expert_slots(1, np.array([5, -1, 0, 5]), torch.float32)
    experts = model.moe_blocks[1].experts
    assert w13_SHD.shape == (4, 2 * 96, 64) and w2_SDF.shape == (4, 64, 96)
    for slot, expert in ((0, 5), (2, 0), (3, 5)):
        assert torch.equal(w13_SHD[slot], experts.w13_EHD[expert])
        assert torch.equal(w2_SDF[slot], experts.w2_EDF[expert])
    assert not w13_SHD[1].any() and not w2_SDF[1].any(), "a free slot is zero"
    assert not torch.equal(w13_SHD[0], model.moe_blocks[0].experts.w13_EHD[5]), "MoE layer 1 is not layer 0"
    with pytest.raises(ValueError, match=r"experts \[8\] are outside -1..7"):
        reader.read_expert_slots(0, np.array([8]), torch.float32)
    with pytest.raises(IndexError, match="moe_layer=2"):
        reader.read_expert_slots(2, np.array([0]), torch.float32)


def test_per_expert_names_are_transformers_names(tmp_path):
    directory, _ = make(tmp_path, "mixtral")
    names = set(read_safetensors_header(directory / WEIGHTS_FILE))
    assert "model.layers.1.block_sparse_moe.experts.7.w3.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    directory, _ = make(tmp_path, "deepseek_v3", num_hidden_layers=3, dense_layer_indices=(0,))
    names = set(read_safetensors_header(directory / WEIGHTS_FILE))
    assert {"model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.2.mlp.shared_experts.up_proj.weight", "model.layers.2.mlp.experts.3.down_proj.weight",
            "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"} <= names


def test_missing_tensor_is_named_with_its_expected_shape(tmp_path):
    directory, _ = make(tmp_path)
    tensors = load_file(directory / WEIGHTS_FILE)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, directory / WEIGHTS_FILE)
    missing = r"tensor 'model.layers.1.mlp.experts.3.up_proj.weight' is missing \(expected shape \[96, 64\]\)"
    with pytest.raises(CheckpointError, match=missing):
        check_checkpoint(directory)
    reader = CheckpointReader(directory)
    reader.read_expert_slots(1, np.array([2]), torch.float32)  # other experts still load
    with pytest.raises(CheckpointError, match=missing):
        reader.read_expert_slots(1, np.array([3]), torch.float32)


def test_misshaped_tensor_names_file_and_both_shapes(tmp_path):
    directory, _ = make(tmp_path, max_shard_bytes=40_000)
    index = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
    shard = directory / index["model.layers.0.mlp.gate.weight"]
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.gate.weight"] = torch.zeros(7, 64)
    save_file(tensors, shard)
    want = (rf"{shard.name}: tensor 'model.layers.0.mlp.gate.weight' has shape \[7, 64\], expected \[8, 64\]$")
    with pytest.raises(CheckpointError, match=want):
        check_checkpoint(directory)
    with pytest.raises(CheckpointError, match=want):
        load_reference_model(directory)


def test_extra_tensors_are_ignored(tmp_path):
    directory, model = make(tmp_path)
    tensors = load_file(directory / WEIGHTS_FILE)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, directory / WEIGHTS_FILE)
    assert check_checkpoint(directory, model.cfg) == model.cfg
    assert_same_parameters(load_reference_model(directory), model)


def test_integer_tensor_is_rejected(tmp_path):
    directory, _ = make(tmp_path)
    tensors = load_file(directory / WEIGHTS_FILE)
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(tensors, directory / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has dtype I32, expected a float"):
        check_checkpoint(directory)


def test_unknown_architecture_lists_the_supported_ones(tmp_path):
    directory, _ = make(tmp_path)
    hf = json.loads((directory / CONFIG_FILE).read_text())
    hf["architectures"] = ["LlamaForCausalLM"]
    (directory / CONFIG_FILE).write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="'LlamaForCausalLM' is not supported") as err:
        check_checkpoint(directory)
    for name in supported_architectures():
        assert name in str(err.value)
    assert len(supported_architectures()) == 5


def test_config_mismatch_names_each_field_with_both_values(tmp_path):
    directory, model = make(tmp_path)
    expected = tiny_model_config("qwen3_moe", num_experts=16, top_k=4)
    with pytest.raises(CheckpointError, match=r"num_experts: checkpoint 8, config 16") as err:
        check_checkpoint(directory, expected)
    assert "top_k: checkpoint 2, config 4" in str(err.value)
    assert "hidden_size" not in str(err.value)
    assert check_checkpoint(directory, model.cfg) == model.cfg


def test_sharded_checkpoint_round_trip(tmp_path):
    directory, model = make(tmp_path, "deepseek_v3", max_shard_bytes=50_000)
    index = json.loads((directory / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (directory / WEIGHTS_FILE).exists()
    for shard in shards:  # within the limit (plus its header), or one tensor larger than the limit alone
        tensors = read_safetensors_header(directory / shard)
        payload = sum(4 * int(np.prod(t.shape)) for t in tensors.values())
        assert payload <= 50_000 or len(tensors) == 1, (shard, payload, len(tensors))
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    assert_same_parameters(load_reference_model(directory), model)
    reader = CheckpointReader(directory)
    w13, _ = reader.read_expert_slots(0, np.array([7, 3]), torch.float32)
    assert torch.equal(w13[1], model.moe_blocks[0].experts.w13_EHD[3])
    # Writing again unsharded removes the shards and the index, so nothing stale shadows the new file.
    write_checkpoint(model, directory)
    assert not (directory / INDEX_FILE).exists() and not any((directory / s).exists() for s in shards)
    assert_same_parameters(load_reference_model(directory), model)


def test_bad_index_and_missing_files_are_named(tmp_path):
    directory, _ = make(tmp_path, max_shard_bytes=60_000)
    index_path = directory / INDEX_FILE
    index = json.loads(index_path.read_text())
    first_shard = sorted(set(index["weight_map"].values()))[0]
    (directory / first_shard).rename(directory / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match=rf"{INDEX_FILE}: names shard '{first_shard}'.*which does not exist"):
        check_checkpoint(directory)
    (directory / "elsewhere.safetensors").rename(directory / first_shard)
    name = next(n for n, f in index["weight_map"].items() if f == first_shard)
    other = next(f for f in index["weight_map"].values() if f != first_shard)
    index["weight_map"][name] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"puts tensor '{name}' in {other}, whose header does not list it"):
        check_checkpoint(directory)
    index_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{INDEX_FILE}: not a valid safetensors index"):
        check_checkpoint(directory)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=rf"checkpoint {empty}: no config.json"):
        check_checkpoint(empty)
    (empty / CONFIG_FILE).write_text((directory / CONFIG_FILE).read_text())
    with pytest.raises(CheckpointError, match=rf"checkpoint {empty}: no {WEIGHTS_FILE} and no {INDEX_FILE}"):
        CheckpointReader(empty)
    (empty / WEIGHTS_FILE).write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}: not a safetensors file"):
        CheckpointReader(empty)


def test_scaled_rope_is_rejected_naming_it(tmp_path):
    directory, _ = make(tmp_path, "deepseek_v3")
    hf = json.loads((directory / CONFIG_FILE).read_text())
    hf["rope_parameters"] = {"rope_type": "yarn", "factor": 40.0, "rope_theta": 10000.0}
    (directory / CONFIG_FILE).write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"rope_type 'yarn'.*not supported"):
        check_checkpoint(directory)


def test_invalid_config_values_are_named(tmp_path):
    directory, _ = make(tmp_path)
    hf = json.loads((directory / CONFIG_FILE).read_text())
    hf.update(num_attention_heads=6, num_key_value_heads=4)
    (directory / CONFIG_FILE).write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"num_attention_heads=6 is not a multiple of num_key_value_heads=4"):
        check_checkpoint(directory)
    with pytest.raises(ValidationError, match=r"dense_layer_indices \[2\] are outside 0..1"):
        tiny_model_config("qwen2_moe", dense_layer_indices=(2,))
    with pytest.raises(ValidationError, match="needs at least one MoE layer"):
        tiny_model_config("qwen2_moe", dense_layer_indices=(0, 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_config_round_trip(family):
    cfg = tiny_model_config(family, eos_token_ids=(3, 7), bos_token_id=1)
    adapter = adapter_for_family(family)
    assert adapter.config_from_hf(json.loads(json.dumps(adapter.config_to_hf(cfg)))) == cfg


def test_check_checkpoint_is_fast_and_reads_headers_only(tmp_path):
    directory, model = make(tmp_path, "deepseek_v3", max_shard_bytes=30_000)
    check_checkpoint(directory)  # warm imports
    started = time.perf_counter()
    assert check_checkpoint(directory, expected=model.cfg) == model.cfg
    assert time.perf_counter() - started < 1.0


def test_init_random_gives_order_one_activations():
    for family in FAMILIES:
        model = init_random_(MoECausalLM(tiny_model_config(family)), seed=3)
        again = init_random_(MoECausalLM(tiny_model_config(family)), seed=3)
        assert_same_parameters(model, again)
        cache = model.new_cache(num_blocks=4, block_size=8)
        batch = AttentionBatch.build([SeqSpan((0, 1, 2), 0, 20)], 8)
        logits = model.compute_logits(model(torch.arange(20) * 7 % 512, batch, cache))
        assert torch.isfinite(logits).all()
        assert 0.1 < float(logits.std()) < 30, (family, float(logits.std()))

"""Checkpoints: a directory with `config.json` (ModelConfig) and `*.safetensors` files.

Tensor names follow the HF MoE convention so per-expert tensors can be read one by one:
    embed_tokens.weight [V, D]          norm.weight [D]            lm_head.weight [V, D]
    layers.{l}.norm.weight [D]          layers.{l}.router.weight [E, D]
    layers.{l}.router.selection_bias [E]                         (selection_bias only)
    layers.{l}.experts.{e}.{gate_proj,up_proj}.weight [F, D]    .down_proj.weight [D, F]
    layers.{l}.shared_expert.{gate_proj,up_proj}.weight [Fs, D] .down_proj.weight [D, Fs]
    layers.{l}.shared_expert_gate.weight [1, D]                  (shared_expert_gate only)
A worker reads the dense tensors and only the experts of its own slots (`read_expert_slots`).
Missing or misshaped tensors raise CheckpointError naming the tensor, the file and the shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeray.config import ModelConfig
from moeray.errors import CheckpointError
from moeray.models.moe_model import MoEModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    prefix = f"layers.{layer}.experts.{expert}"
    return f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight"


def _dense_tensors(model: MoEModel) -> dict[str, torch.Tensor]:
    """Checkpoint name -> tensor for everything except the routed experts."""
    out = {"embed_tokens.weight": model.embed_VD, "norm.weight": model.norm.weight, "lm_head.weight": model.lm_head_VD}
    for l, layer in enumerate(model.layers):
        out[f"layers.{l}.norm.weight"] = layer.norm.weight
        out[f"layers.{l}.router.weight"] = layer.router.weight_ED
        if layer.router.selection_bias_E is not None:
            out[f"layers.{l}.router.selection_bias"] = layer.router.selection_bias_E
        shared = layer.shared_expert
        if shared is not None:
            gate, up = shared.w13_HD.chunk(2, dim=0)
            out[f"layers.{l}.shared_expert.gate_proj.weight"] = gate
            out[f"layers.{l}.shared_expert.up_proj.weight"] = up
            out[f"layers.{l}.shared_expert.down_proj.weight"] = shared.w2_DF
            if shared.gate_1D is not None:
                out[f"layers.{l}.shared_expert_gate.weight"] = shared.gate_1D
    return out


def save_checkpoint(model: MoEModel, directory: str | Path) -> Path:
    """Write a reference model (DenseExperts in every layer) as config.json + model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = dict(_dense_tensors(model))
    for l, layer in enumerate(model.layers):
        w13_EHD, w2_EDF = layer.experts.w13_EHD, layer.experts.w2_EDF
        for e in range(w13_EHD.shape[0]):
            gate, up, down = _expert_names(l, e)
            tensors[gate], tensors[up] = w13_EHD[e].chunk(2, dim=0)
            tensors[down] = w2_EDF[e]
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(model.cfg.model_dump_json(indent=2))
    return directory


def read_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"checkpoint {directory}: no {CONFIG_FILE}")
    return ModelConfig.model_validate(json.loads(path.read_text()))


class CheckpointReader:
    """Lazy reader over a checkpoint's safetensors files: opens each tensor only when asked."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.cfg = read_config(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"checkpoint {self.directory}: no *.safetensors files")
        self._file_of: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():
                    self._file_of[name] = file

    def read(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        file = self._file_of.get(name)
        if file is None:
            raise CheckpointError(f"checkpoint {self.directory}: tensor {name!r} is missing (expected shape {list(shape)})")
        with safe_open(str(file), framework="pt") as fh:
            tensor = fh.get_tensor(name)
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"checkpoint {file}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"checkpoint {file}: tensor {name!r} has dtype {tensor.dtype}, expected a float")
        return tensor.to(dtype)

    def load_dense_into(self, model: MoEModel) -> None:
        """Fill every non-expert parameter of `model` (whatever its experts module is)."""
        for name, param in _dense_tensors(model).items():
            # _dense_tensors yields views (chunks of w13); copying into a view writes the parameter.
            param.data.copy_(self.read(name, tuple(param.shape), param.dtype))

    def read_expert_slots(self, layer: int, experts_S: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13_SHD, w2_SDF) for the given experts, in order; free slots (-1) are filled with zeros."""
        cfg = self.cfg
        D, F = cfg.hidden_size, cfg.moe_intermediate_size
        w13_SHD = torch.zeros(len(experts_S), 2 * F, D, dtype=dtype)
        w2_SDF = torch.zeros(len(experts_S), D, F, dtype=dtype)
        for slot, expert in enumerate(np.asarray(experts_S).tolist()):
            if expert < 0:
                continue
            gate, up, down = _expert_names(layer, expert)
            w13_SHD[slot, :F] = self.read(gate, (F, D), dtype)
            w13_SHD[slot, F:] = self.read(up, (F, D), dtype)
            w2_SDF[slot] = self.read(down, (D, F), dtype)
        return w13_SHD, w2_SDF


def load_reference_model(directory: str | Path) -> MoEModel:
    """The single-process oracle, loaded from a checkpoint."""
    reader = CheckpointReader(directory)
    cfg = reader.cfg
    dtype = getattr(torch, cfg.dtype)
    model = MoEModel(cfg).to(dtype)
    reader.load_dense_into(model)
    all_experts = np.arange(cfg.num_experts)
    for l, layer in enumerate(model.layers):
        w13, w2 = reader.read_expert_slots(l, all_experts, dtype)
        layer.experts.w13_EHD.data.copy_(w13)
        layer.experts.w2_EDF.data.copy_(w2)
    return model

"""Hugging Face checkpoints: `config.json` + `model.safetensors` (or shards named by
`model.safetensors.index.json`), for the families in `moeray.models.registry`.

- Names, shapes and dtypes come from the safetensors headers only (8-byte little-endian length, then
  a JSON header): `check_checkpoint` validates a checkpoint without reading any tensor data.
- Tensors are read memory-mapped one at a time (`safe_open`), so a worker holds its dense weights and
  its own slots, never the whole checkpoint; for the fused 3-D expert layout only the needed expert
  rows are read (`get_slice`).
- Errors are `CheckpointError`s with one line naming the tensor, its file and both shapes.

Legend: S slots, E experts, D hidden, F expert FFN width, H = 2F (gate rows then up rows).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from moeray.config import ModelConfig
from moeray.errors import CheckpointError
from moeray.models.adapter_base import LAYOUTS, HFAdapter, Layout
from moeray.models.decoder import MoECausalLM, init_random_  # noqa: F401  (init_random_ is part of this API)
from moeray.models.registry import adapter_for_architecture

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what its header says."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo from a safetensors file's header (no tensor data is read)."""
    try:
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            length = int.from_bytes(prefix, "little")
            if length > min(_MAX_HEADER_BYTES, path.stat().st_size - 8):
                raise CheckpointError(f"{path}: not a safetensors file (header length {length} exceeds the file)")
            header = json.loads(fh.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors header ({err})") from err
    return {name: TensorInfo(path, tuple(entry["shape"]), entry["dtype"])
            for name, entry in header.items() if name != "__metadata__"}


def read_hf_config(directory: str | Path) -> ModelConfig:
    """config.json -> ModelConfig through the adapter of its `architectures[0]`."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory}: no {CONFIG_FILE} ({path})")
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    architectures = hf.get("architectures") or []
    if not architectures:
        raise CheckpointError(f"{path}: no 'architectures' entry naming the model class")
    adapter = adapter_for_architecture(architectures[0])
    try:
        return adapter.config_from_hf(hf)
    except ValidationError as err:
        reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise CheckpointError(f"{path}: {reasons}") from err


def index_tensors(directory: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint: from the shards the index names, else from model.safetensors."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({err!r})") from err
        headers: dict[str, dict[str, TensorInfo]] = {}
        tensors: dict[str, TensorInfo] = {}
        for name, file_name in weight_map.items():
            if file_name not in headers:
                shard = directory / file_name
                if not shard.is_file():
                    raise CheckpointError(f"{index_path}: names shard {file_name!r} (for {name!r}), "
                                          "which does not exist")
                headers[file_name] = read_safetensors_header(shard)
            if name not in headers[file_name]:
                raise CheckpointError(f"{index_path}: puts tensor {name!r} in {file_name}, "
                                      "whose header does not list it")
            tensors[name] = headers[file_name][name]
        return tensors
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        return read_safetensors_header(weights)
    raise CheckpointError(f"checkpoint {directory}: no {WEIGHTS_FILE} and no {INDEX_FILE}")


def _meta_model(cfg: ModelConfig) -> MoECausalLM:
    """Parameter names and shapes without memory (the meta device allocates nothing)."""
    with torch.device("meta"):
        return MoECausalLM(cfg)


def _shape(shape: Any) -> list[int]:
    return [int(s) for s in shape]


def config_differences(checkpoint: ModelConfig, expected: ModelConfig) -> list[str]:
    """'field: checkpoint X, config Y' for every field that differs. `dtype` is not compared: it is
    what the run computes in (a bf16 checkpoint may run in fp32), not part of the model."""
    have, want = checkpoint.model_dump(), expected.model_dump()
    return [f"{key}: checkpoint {have[key]!r}, config {want[key]!r}" for key in have
            if key != "dtype" and have[key] != want[key]]


def expected_tensors(cfg: ModelConfig, layout: Layout = "per_expert") -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint of `cfg` holds in `layout`, dense first, then the
    experts layer by layer (the order writers stream them in)."""
    adapter, model = adapter_for_architecture(cfg.architecture), _meta_model(cfg)
    params = dict(model.named_parameters())
    out = []
    for tmap in adapter.dense_tensor_maps(model, layout):
        shape = tuple(params[tmap.param].shape)
        if tmap.rows is not None:
            shape = (tmap.rows[1] - tmap.rows[0], *shape[1:])
        out.append((tmap.name, shape))
    D, F, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    for layer in cfg.moe_layer_indices:
        if layout == "fused":
            gate_up, down = adapter.fused_expert_tensor_names(layer)
            out += [(gate_up, (E, 2 * F, D)), (down, (E, D, F))]
            continue
        for expert in range(E):
            gate, up, down = adapter.expert_tensor_names(layer, expert)
            out += [(gate, (F, D)), (up, (F, D)), (down, (D, F))]
    return out


class CheckpointReader:
    """Reader over one checkpoint directory; opens each tensor only when asked.

    `cfg` is the checkpoint's ModelConfig; `layout` is "per_expert" or "fused" (detected from the
    tensor names of the first MoE layer).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.cfg = read_hf_config(self.directory)
        self.adapter: HFAdapter = adapter_for_architecture(self.cfg.architecture)
        self.tensors = index_tensors(self.directory)
        gate_up_name, _ = self.adapter.fused_expert_tensor_names(self.cfg.moe_layer_indices[0])
        self.layout: Layout = "fused" if gate_up_name in self.tensors else "per_expert"

    # ---- validation from the headers --------------------------------------------------------------

    def expected_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor the model reads, dense first, then experts layer by layer."""
        return expected_tensors(self.cfg, self.layout)

    def _info(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"checkpoint {self.directory}: tensor {name!r} is missing "
                                  f"(expected shape {_shape(shape)})")
        if info.shape != tuple(shape):
            raise CheckpointError(f"checkpoint {info.file}: tensor {name!r} has shape {_shape(info.shape)}, "
                                  f"expected {_shape(shape)}")
        if info.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"checkpoint {info.file}: tensor {name!r} has dtype {info.dtype}, expected a float")
        return info

    def check(self, expected: ModelConfig | None = None) -> ModelConfig:
        """Validate the config (against `expected` when given) and every tensor's name, shape and dtype."""
        if expected is not None:
            diffs = config_differences(self.cfg, expected)
            if diffs:
                raise CheckpointError(f"checkpoint {self.directory} does not match the config: {'; '.join(diffs)}")
        for name, shape in self.expected_tensors():
            self._info(name, shape)
        return self.cfg

    # ---- reads ------------------------------------------------------------------------------------

    def _read(self, handles: dict[Path, Any], stack: ExitStack, name: str, shape: tuple[int, ...],
              dtype: torch.dtype) -> torch.Tensor:
        info = self._info(name, shape)
        if info.file not in handles:
            handles[info.file] = stack.enter_context(safe_open(str(info.file), framework="pt"))
        return handles[info.file].get_tensor(name).to(dtype)

    @torch.no_grad()
    def load_dense_into(self, model: MoECausalLM) -> None:
        """Fill every parameter of `model` outside its experts modules (whatever they are)."""
        params = dict(model.named_parameters())
        with ExitStack() as stack:
            handles: dict[Path, Any] = {}
            for tmap in self.adapter.dense_tensor_maps(model, self.layout):
                param = params[tmap.param]
                target = param.data if tmap.rows is None else param.data[tmap.rows[0]:tmap.rows[1]]
                target.copy_(self._read(handles, stack, tmap.name, tuple(target.shape), param.dtype))

    def read_expert_slots(self, moe_layer: int, experts_S: np.ndarray, dtype: torch.dtype
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13_SHD [S, 2F, D] gate rows then up rows, w2_SDF [S, D, F]) of MoE layer `moe_layer`
        (0 .. num_moe_layers - 1) for the given logical experts in slot order; -1 (free slot) -> zeros."""
        cfg = self.cfg
        if not 0 <= moe_layer < cfg.num_moe_layers:
            raise IndexError(f"moe_layer={moe_layer} is outside 0..{cfg.num_moe_layers - 1}")
        experts = [int(e) for e in np.asarray(experts_S).reshape(-1)]
        bad = [e for e in experts if not -1 <= e < cfg.num_experts]
        if bad:
            raise ValueError(f"experts {bad} are outside -1..{cfg.num_experts - 1}")
        layer = cfg.moe_layer_indices[moe_layer]
        D, F, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        w13_SHD = torch.zeros(len(experts), 2 * F, D, dtype=dtype)
        w2_SDF = torch.zeros(len(experts), D, F, dtype=dtype)
        with ExitStack() as stack:
            handles: dict[Path, Any] = {}
            if self.layout == "fused":
                gate_up, down = self.adapter.fused_expert_tensor_names(layer)
                slices = []
                for name, shape in ((gate_up, (E, 2 * F, D)), (down, (E, D, F))):
                    info = self._info(name, shape)
                    if info.file not in handles:
                        handles[info.file] = stack.enter_context(safe_open(str(info.file), framework="pt"))
                    slices.append(handles[info.file].get_slice(name))
                for slot, expert in enumerate(experts):
                    if expert >= 0:  # only this expert's rows are read from the file
                        w13_SHD[slot] = slices[0][expert:expert + 1][0].to(dtype)
                        w2_SDF[slot] = slices[1][expert:expert + 1][0].to(dtype)
                return w13_SHD, w2_SDF
            for slot, expert in enumerate(experts):
                if expert < 0:
                    continue
                gate, up, down = self.adapter.expert_tensor_names(layer, expert)
                w13_SHD[slot, :F] = self._read(handles, stack, gate, (F, D), dtype)
                w13_SHD[slot, F:] = self._read(handles, stack, up, (F, D), dtype)
                w2_SDF[slot] = self._read(handles, stack, down, (D, F), dtype)
        return w13_SHD, w2_SDF


def check_checkpoint(directory: str | Path, expected: ModelConfig | None = None) -> ModelConfig:
    """Validate config, index and every expected tensor from the headers alone; returns the config."""
    return CheckpointReader(directory).check(expected)


def load_reference_model(directory: str | Path) -> MoECausalLM:
    """The single-process oracle (DenseExperts, every expert), loaded from a checkpoint."""
    reader = CheckpointReader(directory)
    cfg = reader.cfg
    dtype = getattr(torch, cfg.dtype)
    model = MoECausalLM(cfg).to(dtype)
    reader.load_dense_into(model)
    all_experts = np.arange(cfg.num_experts)
    with torch.no_grad():
        for moe_layer, block in enumerate(model.moe_blocks):
            w13_EHD, w2_EDF = reader.read_expert_slots(moe_layer, all_experts, dtype)
            block.experts.w13_EHD.copy_(w13_EHD)
            block.experts.w2_EDF.copy_(w2_EDF)
    return model


def _checkpoint_tensors(model: MoECausalLM, adapter: HFAdapter, layout: Layout) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    for tmap in adapter.dense_tensor_maps(model, layout):
        value = params[tmap.param].detach()
        tensors[tmap.name] = value if tmap.rows is None else value[tmap.rows[0]:tmap.rows[1]]
    F = model.cfg.moe_intermediate_size
    for moe_layer, block in enumerate(model.moe_blocks):
        experts = block.experts
        if not (hasattr(experts, "w13_EHD") and hasattr(experts, "w2_EDF")):
            raise TypeError(f"write_checkpoint needs every expert in the model; MoE layer {moe_layer} holds "
                            f"{type(experts).__name__} (use the reference model, DenseExperts)")
        layer = model.cfg.moe_layer_indices[moe_layer]
        w13_EHD, w2_EDF = experts.w13_EHD.detach(), experts.w2_EDF.detach()
        if layout == "fused":
            gate_up, down = adapter.fused_expert_tensor_names(layer)
            tensors[gate_up], tensors[down] = w13_EHD, w2_EDF
            continue
        for expert in range(w13_EHD.shape[0]):
            gate, up, down = adapter.expert_tensor_names(layer, expert)
            tensors[gate], tensors[up], tensors[down] = w13_EHD[expert, :F], w13_EHD[expert, F:], w2_EDF[expert]
    return {name: t.to("cpu").contiguous().clone() for name, t in tensors.items()}


def write_checkpoint(model: MoECausalLM, directory: str | Path, layout: Layout = "per_expert",
                     max_shard_bytes: int | None = None) -> Path:
    """Write `model` (every expert present) in Hugging Face format: config.json that transformers
    loads, and safetensors weights, split into shards of <= max_shard_bytes (a tensor larger than
    that gets a shard of its own) with an index when max_shard_bytes is set."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    adapter = adapter_for_architecture(model.cfg.architecture)
    tensors = _checkpoint_tensors(model, adapter, layout)
    specs = [(name, tuple(t.shape), t.element_size()) for name, t in tensors.items()]
    return write_tensors(directory, model.cfg, specs, lambda name, _shape: tensors[name], max_shard_bytes)


def write_tensors(directory: str | Path, cfg: ModelConfig, specs: list[tuple[str, tuple[int, ...], int]],
                  make, max_shard_bytes: int | None = None) -> Path:
    """Write config.json for `cfg` and the tensors named by specs [(name, shape, itemsize)], each made
    by `make(name, shape)` only when its shard is written: one shard's tensors are in memory at a
    time, so a checkpoint larger than host memory can be written shard by shard."""
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapter = adapter_for_architecture(cfg.architecture)
    _remove_previous_weights(directory)
    metadata = {"format": "pt"}
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    shard_bytes = 0
    for name, shape, itemsize in specs:
        size = int(np.prod(shape)) * itemsize
        if max_shard_bytes is not None and shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, shape))
        shard_bytes += size
    if max_shard_bytes is None:
        save_file({name: make(name, shape) for name, shape in shards[0]}, str(directory / WEIGHTS_FILE),
                  metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({name: make(name, shape) for name, shape in shard}, str(directory / file_name), metadata=metadata)
            weight_map.update({name: file_name for name, _ in shard})
        total = sum(int(np.prod(shape)) * itemsize for _, shape, itemsize in specs)
        (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                       indent=2))
    (directory / CONFIG_FILE).write_text(json.dumps(adapter.config_to_hf(cfg), indent=2))
    return directory


def _remove_previous_weights(directory: Path) -> None:
    """Drop the weights an earlier write left here, so a stale index never shadows the new files."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            for file_name in set(json.loads(index_path.read_text()).get("weight_map", {}).values()):
                (directory / file_name).unlink(missing_ok=True)
        except (OSError, json.JSONDecodeError, AttributeError):
            pass  # a broken index: removing it below is enough
        index_path.unlink()
    (directory / WEIGHTS_FILE).unlink(missing_ok=True)

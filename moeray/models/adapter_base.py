"""What every family's checkpoint adapter shares: HF config parsing helpers and tensor-name mapping.

An adapter translates between a Hugging Face checkpoint and `MoECausalLM`:
- `config_from_hf(config.json dict) -> ModelConfig` and `config_to_hf(ModelConfig) -> dict`;
- `dense_tensor_maps(model, layout)`: for every non-expert parameter of our model, the checkpoint
  tensor(s) it is made of (`TensorMap`: our w13 = [gate rows; up rows] comes from two tensors);
- `expert_tensor_names(layer, expert)` (per-expert layout) and `fused_expert_tensor_names(layer)`
  (the 3-D layout transformers keeps in memory: gate_up_proj [E, 2F, D] gate rows first,
  down_proj [E, D, F], the same orientation as our w13_EHD / w2_EDF).

Our attention and norm parameters carry transformers' in-memory names (layers.{l}.self_attn.q_proj.weight,
...), so most names only gain the "model." prefix; the MoE block differs per family in its module name
(Mixtral's per-expert files use block_sparse_moe), its expert projection names (Mixtral w1/w3/w2) and
its shared expert name (shared_expert / shared_experts).

Legend: E experts, F expert FFN width, H = 2F, D hidden.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from moeray.config import ModelConfig
from moeray.errors import CheckpointError

Layout = Literal["per_expert", "fused"]
LAYOUTS: tuple[str, ...] = ("per_expert", "fused")
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32", "bf16": "bfloat16",
           "fp16": "float16"}


@dataclass(frozen=True)
class TensorMap:
    """Checkpoint tensor `name` fills rows [rows[0], rows[1]) of dim 0 of our parameter `param`
    (all of it when rows is None)."""

    name: str
    param: str
    rows: tuple[int, int] | None = None


class HFAdapter:
    """Base of the per-family adapters; subclasses set the class attributes and the two config hooks."""

    architecture: ClassVar[str]
    family: ClassVar[str]
    model_type: ClassVar[str]
    moe_module_per_expert: ClassVar[str] = "mlp"
    moe_module_fused: ClassVar[str] = "mlp"
    shared_module: ClassVar[str] = "shared_expert"
    expert_proj_names: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        raise NotImplementedError

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        raise NotImplementedError

    # ---- tensor names ---------------------------------------------------------------------------

    def expert_tensor_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        """(gate [F, D], up [F, D], down [D, F]) names of one expert of decoder layer `layer`."""
        prefix = f"model.layers.{layer}.{self.moe_module_per_expert}.experts.{expert}"
        return tuple(f"{prefix}.{proj}.weight" for proj in self.expert_proj_names)  # type: ignore[return-value]

    def fused_expert_tensor_names(self, layer: int) -> tuple[str, str]:
        """(gate_up_proj [E, 2F, D], down_proj [E, D, F]) names of decoder layer `layer`."""
        prefix = f"model.layers.{layer}.{self.moe_module_fused}.experts"
        return f"{prefix}.gate_up_proj", f"{prefix}.down_proj"

    def dense_tensor_maps(self, model: nn.Module, layout: Layout) -> list[TensorMap]:
        """Every parameter of `model` outside the routed experts, with the checkpoint tensors it reads.
        `model` may live on the meta device (only names and shapes are used)."""
        maps: list[TensorMap] = []
        for param_name, param in model.named_parameters():
            if ".experts." in param_name:
                continue  # routed experts: read per slot (expert_tensor_names / fused_expert_tensor_names)
            maps.extend(self._maps_of(param_name, param.shape[0], layout))
        return maps

    def _maps_of(self, param_name: str, rows: int, layout: Layout) -> list[TensorMap]:
        if param_name in ("embed_tokens.weight", "norm.weight"):
            return [TensorMap(f"model.{param_name}", param_name)]
        if param_name == "lm_head.weight":
            return [TensorMap(param_name, param_name)]
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", param_name)
        if match is None:
            raise KeyError(f"{type(self).__name__}: no checkpoint name for parameter {param_name!r}")
        layer, rest = int(match.group(1)), match.group(2)
        base = f"model.layers.{layer}"
        moe = f"{base}.{self.moe_module_fused if layout == 'fused' else self.moe_module_per_expert}"
        if rest.startswith(("self_attn.", "input_layernorm.", "post_attention_layernorm.")):
            return [TensorMap(f"{base}.{rest}", param_name)]
        swiglu_owner = {"mlp.w13_HD": f"{base}.mlp", "mlp.w2_DF": f"{base}.mlp",
                        "mlp.shared_expert.w13_HD": f"{moe}.{self.shared_module}",
                        "mlp.shared_expert.w2_DF": f"{moe}.{self.shared_module}"}
        if rest in swiglu_owner:
            owner = swiglu_owner[rest]
            if rest.endswith("w2_DF"):
                return [TensorMap(f"{owner}.down_proj.weight", param_name)]
            half = rows // 2
            return [TensorMap(f"{owner}.gate_proj.weight", param_name, (0, half)),
                    TensorMap(f"{owner}.up_proj.weight", param_name, (half, rows))]
        simple = {"mlp.router.weight_ED": f"{moe}.gate.weight",
                  "mlp.router.selection_bias_E": f"{moe}.gate.e_score_correction_bias",
                  "mlp.shared_expert.gate_1D": f"{moe}.shared_expert_gate.weight"}
        if rest in simple:
            return [TensorMap(simple[rest], param_name)]
        raise KeyError(f"{type(self).__name__}: no checkpoint name for parameter {param_name!r}")


# ---- config.json helpers shared by the families --------------------------------------------------


def value_or_default(hf: dict[str, Any], defaults: dict[str, Any], key: str, architecture: str) -> Any:
    """hf[key], else the family's default; a key with neither raises, naming it."""
    value = hf.get(key)
    if value is None:
        value = defaults.get(key)
    if value is None and key not in defaults:
        raise CheckpointError(f"{architecture} config.json has no {key!r}")
    return value


def rope_theta_of(hf: dict[str, Any], default: float, architecture: str) -> float:
    """RoPE base from transformers 5 `rope_parameters` or the older top-level `rope_theta` /
    `rope_scaling`. Only default (unscaled) RoPE is supported: anything else raises, naming it."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for source, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = spec.get("rope_type", spec.get("type", "default")) if spec else "default"
        if kind not in (None, "default"):
            raise CheckpointError(f"{architecture}: {source} with rope_type {kind!r} ({spec}) is not supported; "
                                  "only default RoPE is")
    return float(params.get("rope_theta") or hf.get("rope_theta") or default)


def eos_ids_of(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def common_fields(hf: dict[str, Any], architecture: str, family: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The fields every family reads the same way (hidden sizes, heads, norms, tokens, dtype).
    `defaults` holds the family's transformers config-class defaults for keys a config.json may omit."""
    def get(key: str) -> Any:
        return value_or_default(hf, defaults, key, architecture)

    act = hf.get("hidden_act") or "silu"
    if act != "silu":
        raise CheckpointError(f"{architecture}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
    hidden = int(get("hidden_size"))
    heads = int(get("num_attention_heads"))
    dtype_name = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
    if dtype_name not in _DTYPES:
        raise CheckpointError(f"{architecture}: dtype {dtype_name!r} is not one of float32, bfloat16, float16")
    bos = hf.get("bos_token_id")
    return dict(
        architecture=architecture, family=family,
        vocab_size=int(get("vocab_size")), hidden_size=hidden, num_hidden_layers=int(get("num_hidden_layers")),
        rms_norm_eps=float(get("rms_norm_eps")), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids_of(hf), dtype=_DTYPES[dtype_name],
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or defaults.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rope_theta=rope_theta_of(hf, defaults.get("rope_theta", 10000.0), architecture),
        max_position_embeddings=int(get("max_position_embeddings")),
    )


def common_hf_fields(cfg: ModelConfig, adapter: HFAdapter) -> dict[str, Any]:
    """The config.json keys every family writes the same way."""
    eos: Any = None if not cfg.eos_token_ids else (
        cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else list(cfg.eos_token_ids))
    return {
        "architectures": [adapter.architecture], "model_type": adapter.model_type, "dtype": cfg.dtype,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "attention_dropout": 0.0, "use_cache": True,
    }


def sparse_step_dense_layers(num_layers: int, num_experts: int, sparse_step: int,
                             mlp_only: list[int]) -> tuple[int, ...]:
    """Qwen-MoE rule: layer i has experts iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    return tuple(i for i in range(num_layers)
                 if i in set(mlp_only) or not (num_experts > 0 and (i + 1) % sparse_step == 0))


def check_unsupported(architecture: str, unsupported: dict[str, bool]) -> None:
    for what, present in unsupported.items():
        if present:
            raise CheckpointError(f"{architecture}: {what} is not supported")

"""Architecture name (config.json `architectures[0]`) -> the family's checkpoint adapter."""

from __future__ import annotations

from moeray.errors import CheckpointError
from moeray.models.adapter_base import HFAdapter
from moeray.models.deepseek_v3.adapter import ADAPTER as DEEPSEEK_V3
from moeray.models.mixtral.adapter import ADAPTER as MIXTRAL
from moeray.models.olmoe.adapter import ADAPTER as OLMOE
from moeray.models.qwen2_moe.adapter import ADAPTER as QWEN2_MOE
from moeray.models.qwen3_moe.adapter import ADAPTER as QWEN3_MOE

ADAPTERS: dict[str, HFAdapter] = {a.architecture: a for a in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V3)}
_BY_FAMILY: dict[str, HFAdapter] = {a.family: a for a in ADAPTERS.values()}


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for_architecture(architecture: str) -> HFAdapter:
    adapter = ADAPTERS.get(architecture)
    if adapter is None:
        raise CheckpointError(f"architecture {architecture!r} is not supported; supported: "
                              f"{', '.join(supported_architectures())}")
    return adapter


def adapter_for_family(family: str) -> HFAdapter:
    adapter = _BY_FAMILY.get(family)
    if adapter is None:
        raise CheckpointError(f"family {family!r} is not supported; supported: {', '.join(sorted(_BY_FAMILY))}")
    return adapter

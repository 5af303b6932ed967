"""Service configuration: the checkpoint, the engine's runtime options, and the HTTP knobs.

A service YAML looks like examples/service.yaml:

    checkpoint: /path/to/hf_checkpoint   # an HF directory: config.json, *.safetensors, tokenizer.json
    engine: {parallel: {...}, cache: {...}, rebalance: {...}}   # the model comes from config.json
    serve: {port: 8000}
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field

from moeray.config import EngineOptions, _Frozen


class ServeConfig(_Frozen):
    """HTTP front end."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    route_prefix: str = Field(default="/", pattern=r"^/")
    app_name: str = "moeray"
    max_tokens_per_request: int = Field(default=8192, ge=1)
    max_ongoing_requests: int = Field(default=256, ge=1, description="per replica; beyond it Serve queues or rejects")


class ServiceConfig(_Frozen):
    checkpoint: str = Field(description="HF checkpoint directory (config.json + safetensors)")
    engine: EngineOptions = EngineOptions()
    serve: ServeConfig = ServeConfig()

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServiceConfig:
        with open(path) as fh:
            return cls.model_validate(yaml.safe_load(fh))

"""Service configuration: the engine's config, the checkpoint, and the HTTP/batching knobs.

A service YAML looks like examples/service.yaml:

    checkpoint: /path/to/checkpoint      # a directory written by moeray.models.checkpoint
    engine: {model: {...}, parallel: {...}, rebalance: {...}}
    serve: {port: 8000, max_batch_size: 16, batch_wait_timeout_ms: 5}
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field

from moeray.config import EngineConfig, _Frozen


class ServeConfig(_Frozen):
    """HTTP front end and dynamic batching."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    route_prefix: str = Field(default="/", pattern=r"^/")
    app_name: str = "moeray"
    max_batch_size: int = Field(default=16, ge=1, description="requests merged into one engine step")
    max_batch_tokens: int = Field(default=16384, ge=1, description="tokens merged into one engine step")
    batch_wait_timeout_ms: float = Field(default=2.0, ge=0, description="how long an idle engine waits for more requests")
    max_tokens_per_request: int = Field(default=8192, ge=1)
    max_ongoing_requests: int = Field(default=256, ge=1, description="per replica; beyond it Serve queues or rejects")


class ServiceConfig(_Frozen):
    engine: EngineConfig
    checkpoint: str = Field(description="checkpoint directory (moeray.models.checkpoint format)")
    serve: ServeConfig = ServeConfig()

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServiceConfig:
        with open(path) as fh:
            return cls.model_validate(yaml.safe_load(fh))

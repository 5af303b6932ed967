"""Service configuration: the checkpoint, the engine's runtime options, and the HTTP knobs.

A service YAML looks like examples/service.yaml:

    checkpoint: /path/to/hf_checkpoint   # an HF directory: config.json, *.safetensors, tokenizer.json
    engine: {parallel: {...}, cache: {...}, rebalance: {...}}   # the model comes from config.json
    serve: {port: 8000, api_key: ..., num_replicas: 1}

The same mapping is the `args:` of the app in a `serve deploy` config (examples/serve_config.yaml).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ConfigDict, Field, SecretStr

from moeray.config import EngineOptions, _Frozen

API_KEY_ENV = "MOERAY_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # anything else is reachable from other machines


class ServeConfig(_Frozen):
    """HTTP front end. Strict: YAML's `port: "8000"` or `num_replicas: 1.5` are errors, not guesses."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    host: str = Field(default="127.0.0.1", description="127.0.0.1: this machine only; 0.0.0.0 listens on every "
                                                       "interface (then set api_key)")
    port: int = Field(default=8000, ge=0, le=65535)
    route_prefix: str = Field(default="/", pattern=r"^/")
    app_name: str = Field(default="moeray", min_length=1)
    model_name: str | None = Field(default=None, min_length=1,
                                   description="the `model` clients name; None: the checkpoint directory's name")
    api_key: SecretStr | None = Field(
        default=None, description=f"clients must send `Authorization: Bearer <key>`; None: ${API_KEY_ENV} if set, "
                                  "else no key (GET /healthz is always open)")
    num_replicas: int = Field(default=1, ge=1, description="Serve replicas; each owns one engine (its own workers)")
    max_tokens_per_request: int = Field(default=8192, ge=1, description="prompt + max_tokens one request may ask for")
    default_chat_max_tokens: int = Field(
        default=512, ge=1, description="max_tokens of a chat request that sets none (less if the context has less room)")
    max_ongoing_requests: int = Field(default=256, ge=1, description="per replica; beyond it Serve queues or rejects")

    def resolved_api_key(self) -> str | None:
        """The key requests must carry: the configured one, else $MOERAY_API_KEY, else None."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return os.environ.get(API_KEY_ENV) or None


class ServiceConfig(_Frozen):
    checkpoint: str = Field(description="HF checkpoint directory (config.json + safetensors)")
    engine: EngineOptions = EngineOptions()
    serve: ServeConfig = ServeConfig()

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServiceConfig:
        with open(path) as fh:
            return cls.model_validate(yaml.safe_load(fh))

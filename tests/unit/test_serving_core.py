"""The service's framework-free parts: streamed text deltas that never take text back, chat
templates, the busy-port check, the service config (strict, API key from the environment), and the `serve deploy` config
file (validated offline: Ray Serve's schema, the import path, the builder's args). The engine loop
itself runs in tests/actors/test_serve.py against a real engine."""

from __future__ import annotations

import importlib
import json
import socket
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from moeray.generation.outputs import CompletionOutput
from moeray.serving.chat_template import CHAT_TEMPLATE_FILE, load_chat_template, render_chat
from moeray.serving.config import API_KEY_ENV, ServeConfig, ServiceConfig
from moeray.serving.core import PortInUse, StreamCursor, check_port_free, held_back

REPO = Path(__file__).resolve().parents[2]


def test_held_back_is_the_longest_tail_that_could_start_a_stop_string():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello w", ["world", "xyz"]) == 1
    assert held_back("hello", ["world"]) == 0
    assert held_back("xaba", ["abac"]) == 3 and held_back("abab", ["abac"]) == 2  # the longest tail that fits
    assert held_back("x", []) == 0 and held_back("", ["ab"]) == 0


def _completion(text: str, n_tokens: int, finish: str | None = None) -> CompletionOutput:
    return CompletionOutput(0, text, tuple(range(n_tokens)), None, None, finish)


def test_stream_cursor_sends_each_character_once_and_never_a_stop_string():
    """The driver's cumulative text as a stop string "END" completes across steps: the driver cuts
    the text before it, and the stream must not have sent its start already."""
    cursor = StreamCursor(["END"])
    sent = []
    for text, tokens, finish in [("The E", 2, None), ("The EN", 3, None), ("The ENx E", 4, None),
                                 ("The ENx ", 5, "stop")]:  # "...ENx EN" then "D": the driver cut at " END"
        delta, new = cursor.advance(_completion(text, tokens, finish))
        sent.append((delta, (new.start, new.stop)))
    assert "".join(d for d, _ in sent) == "The ENx "
    assert sent == [("The ", (0, 2)), ("", (2, 3)), ("ENx ", (3, 4)), ("", (4, 5))]


def test_stream_cursor_without_stops_sends_text_as_it_comes_and_the_rest_at_the_end():
    cursor = StreamCursor()
    assert cursor.advance(_completion("ab", 1))[0] == "ab"
    assert cursor.advance(_completion("abcd", 2))[0] == "cd"
    assert cursor.advance(_completion("abcd\ufffd", 3, "length"))[0] == "\ufffd"


TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
            "{{ raise_exception('the system message must come first') }}{% endif %}"
            "[{{ m.role }}] {{ m.content | trim }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def _messages(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


def test_chat_template_from_tokenizer_config_renders_like_transformers(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    template = load_chat_template(tmp_path)
    text = render_chat(template, _messages(("system", "Be brief. "), ("user", "Hi")), "<s>", "</s>")
    assert text == "<s>[system] Be brief.\n[user] Hi\n[assistant]"
    with pytest.raises(ValueError, match="the chat template refused the messages: the system message must come first"):
        render_chat(template, _messages(("user", "Hi"), ("system", "x")))


def test_chat_template_sources_in_order(tmp_path):
    assert load_chat_template(tmp_path) is None  # no tokenizer_config.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert load_chat_template(tmp_path) is None  # one without a template: the tiny model's case
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert load_chat_template(tmp_path) == "D"
    (tmp_path / CHAT_TEMPLATE_FILE).write_text("J")
    assert load_chat_template(tmp_path) == "J"

    class TokenizerWithTemplate:
        chat_template = "K"

    assert load_chat_template(tmp_path, TokenizerWithTemplate()) == "K"


def test_the_built_in_tiny_model_has_no_chat_template(tmp_path):
    from moeray.models.tiny import write_tiny_model

    path, _ = write_tiny_model(tmp_path / "tiny")
    assert load_chat_template(path) is None


def test_a_busy_port_is_named():
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as Serve's proxy binds
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} is in use on 127.0.0.1"):
            check_port_free("127.0.0.1", port)
        with pytest.raises(PortInUse, match=f"port {port} is in use"):
            check_port_free("0.0.0.0", port)  # every interface includes the loopback one
    check_port_free("127.0.0.1", port)  # free again once the listener is gone


def test_serve_config_is_strict_and_reads_the_api_key_from_the_environment(monkeypatch):
    for bad in ({"port": "8000"}, {"num_replicas": 1.5}, {"num_replicas": 0}, {"port": 70000}, {"api_kee": "x"}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            ServeConfig(**bad)
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert ServeConfig().resolved_api_key() is None and ServeConfig().host == "127.0.0.1"
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert ServeConfig().resolved_api_key() == "from-env"
    configured = ServeConfig(api_key="from-config")
    assert configured.resolved_api_key() == "from-config" and "from-config" not in repr(configured)


def test_example_service_yaml_validates_and_round_trips():
    config = ServiceConfig.from_yaml(REPO / "examples" / "service.yaml")
    assert config.serve.host == "127.0.0.1" and config.serve.num_replicas == 1
    assert ServiceConfig.model_validate(config.model_dump()) == config


def test_serve_deploy_config_file_resolves_and_validates_without_starting_serve(monkeypatch):
    pytest.importorskip("ray.serve")
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO / "examples" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)  # Ray Serve's own schema for `serve deploy`
    (app,) = schema.applications
    module, _, name = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), name)
    config = ServiceConfig.model_validate(app.args)
    assert config.engine.parallel.num_workers >= 1 and schema.http_options.host == "127.0.0.1"
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    built = call_user_app_builder_with_args_if_necessary(builder, app.args)  # what `serve deploy` calls
    assert isinstance(built, Application)
    bad = {**app.args, "serve": {"num_replicas": "two"}}
    with pytest.raises(ValidationError, match="num_replicas"):
        builder(bad)

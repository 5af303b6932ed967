"""The deployment files in the repository are valid for the tools that read them: cluster.yaml
for `ray up` (Ray's own schema, after Ray fills its defaults), examples/service.yaml for
`moeray serve`, and the extras cluster.yaml installs exist in pyproject.toml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises jsonschema.ValidationError naming the bad key
    gpu_types = [t for t, spec in config["available_node_types"].items() if spec.get("max_workers", 0) > 0]
    assert gpu_types, "no node type that can scale out"


def test_cluster_yaml_survives_rays_aws_node_config_steps():
    """Ray's bootstrap steps that need no AWS call: network interfaces (each needs a subnet and
    security groups there) and the AMI (without ImageId Ray substitutes an old Ubuntu 18.04 image)."""
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces
    from ray.autoscaler._private.util import prepare_config

    config = _configure_from_network_interfaces(prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text())))
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"].get("ImageId", "").startswith(("ami-", "resolve:ssm:")), name


def test_cluster_yaml_rejects_a_misspelt_key():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


def test_cluster_yaml_installs_extras_that_exist():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    installs = [c for c in config["setup_commands"] if "pip install -e" in c]
    assert installs
    for command in installs:
        wanted = re.search(r"\[([a-z,]+)\]", command).group(1).split(",")
        assert set(wanted) <= extras, (wanted, extras)
    assert config["file_mounts"]["~/moeray"] == "."


def test_example_service_yaml_is_a_valid_service_config():
    from moeray.serving.config import ServiceConfig

    config = ServiceConfig.from_yaml(REPO / "examples" / "service.yaml")
    assert config.engine.parallel.num_workers >= 1 and config.serve.port == 8000


def test_service_config_names_bad_values(tmp_path):
    from pydantic import ValidationError

    from moeray.serving.config import ServiceConfig

    raw = yaml.safe_load((REPO / "examples" / "service.yaml").read_text())
    raw["serve"]["max_tokens_per_request"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValidationError, match="max_tokens_per_request"):
        ServiceConfig.from_yaml(path)


def test_cli_tiny_model_then_check_checkpoint(tmp_path, capsys):
    from moeray.cli import main
    from moeray.models.checkpoint import CheckpointReader

    assert main(["tiny-model", str(tmp_path / "m"), "--family", "olmoe", "--experts", "6"]) == 0
    assert CheckpointReader(tmp_path / "m").cfg.num_experts == 6
    assert (tmp_path / "m" / "tokenizer.json").exists()
    assert main(["check-checkpoint", str(tmp_path / "m")]) == 0
    assert "OlmoeForCausalLM" in capsys.readouterr().out


def test_cli_names_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    import time

    from moeray.cli import main

    start = time.monotonic()
    assert main(["check-checkpoint", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt-ids", "1,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err
    assert time.monotonic() - start < 5

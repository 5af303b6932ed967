"""The `moeray` command: cheap start-up, the flags a new user tripped on, `serve`'s config from
flags and YAML, `status` / `plot` from a saved report and from an HTTP service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from moeray import cli, cli_service
from moeray.cli import main
from tests.unit.test_plot import PLOTS, report_with_rebalance

REPO = Path(__file__).resolve().parents[2]
HEAVY_MODULES = ("torch", "ray", "moeray.bench", "moeray.engine", "matplotlib")


def test_help_validate_config_and_status_import_no_torch_ray_or_benchmarks(tmp_path):
    report = tmp_path / "placement.json"
    report.write_text(json.dumps(report_with_rebalance()))
    probe = (
        "import sys, contextlib, io\n"
        "from moeray.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"    assert main(['validate-config', {str(REPO / 'examples' / 'service.yaml')!r}]) == 0\n"
        f"    assert main(['status', '--json', {str(report)!r}]) == 0\n"
        f"print([m for m in {HEAVY_MODULES!r} if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"imported: {done.stdout}"


def test_demo_rebalance_false_turns_rebalancing_off(monkeypatch):
    import moeray.demo

    seen = []
    monkeypatch.setattr(moeray.demo, "run_demo", seen.append)
    for argv, want in ((["--rebalance", "False"], False), (["--rebalance", "false"], False), (["--no-rebalance"], False),
                       (["--rebalance"], True), (["--rebalance", "yes"], True), ([], True)):
        assert main(["demo", "--workers", "2", *argv]) == 0
        assert seen[-1].rebalance is want, argv
        assert seen[-1].workers == 2
    with pytest.raises(SystemExit) as info:
        main(["demo", "--rebalance", "maybe"])
    assert info.value.code == 2


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("checkpoint: [a\nengine: 3\n", "is not valid YAML at line 2"),
    ("- a list\n", "the top level must be a mapping"),
])
def test_a_bad_config_file_is_one_clear_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "service.yaml"
    if content is not None:
        path.write_text(content)
    for command in (["validate-config", str(path)], ["serve", "--config", str(path)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and str(path) in err, err
        assert "Traceback" not in err


def test_invalid_values_are_named_one_per_line(tmp_path, capsys):
    path = tmp_path / "service.yaml"
    path.write_text("checkpoint: /x\nserve: {port: 99999, colour: red}\n")
    assert main(["validate-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "serve.port: " in err and "(got 99999)" in err and "serve.colour: Extra inputs" in err


def test_the_shipped_service_yaml_validates(capsys):
    assert main(["validate-config", str(REPO / "examples" / "service.yaml")]) == 0
    assert ": ok (" in capsys.readouterr().out


def serve_args(*argv):
    return cli.build_parser(["serve", *argv]).parse_args(["serve", *argv])


def test_serve_without_arguments_is_the_tiny_model_on_localhost(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(cli.API_KEY_ENV, raising=False)
    config = cli_service.service_config_from_args(serve_args())
    model_dir = Path(config.checkpoint)
    assert model_dir.parent == tmp_path / "moeray" and (model_dir / "config.json").exists()
    assert (model_dir / "tokenizer.json").exists() and (model_dir / "model.safetensors").exists()
    assert (config.serve.host, config.serve.port) == ("127.0.0.1", 8000)
    assert config.engine.parallel.num_workers == cli_service.BUILTIN_MODEL_WORKERS and config.engine.parallel.device == "cpu"
    assert config.serve.model_name == cli_service.BUILTIN_MODEL_NAME
    written = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert cli_service.service_config_from_args(serve_args()).checkpoint == str(model_dir)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == written, "the cached model is reused"
    assert [p.name for p in model_dir.parent.iterdir()] == [model_dir.name], "no staging directory is left"


def test_serve_flags_override_the_yaml(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(cli.API_KEY_ENV, raising=False)
    path = tmp_path / "service.yaml"
    raw = yaml.safe_load((REPO / "examples" / "service.yaml").read_text())
    path.write_text(yaml.safe_dump(raw))
    config = cli_service.service_config_from_args(serve_args("--config", str(path), "--port", "9100", "--num-workers", "3",
                                                     "--model", str(tmp_path / "m")))
    assert config.serve.port == 9100 and config.engine.parallel.num_workers == 3
    assert config.checkpoint == str(tmp_path / "m")
    assert config.engine.rebalance.window_steps == raw["engine"]["rebalance"]["window_steps"], "the rest is the YAML's"
    assert config.serve.host == "127.0.0.1"
    exposed = cli_service.service_config_from_args(serve_args("--config", str(path), "--host", "0.0.0.0"))
    cli_service.warn_if_exposed(config)
    assert capsys.readouterr().err == ""
    cli_service.warn_if_exposed(exposed)
    err = capsys.readouterr().err
    assert "0.0.0.0" in err and "reachable from other machines" in err
    with pytest.raises(Exception, match="less than or equal to 65535"):
        cli_service.service_config_from_args(serve_args("--config", str(path), "--port", "70000"))


def test_serve_api_key_replicas_and_model_name_flags(tmp_path, monkeypatch):
    path = tmp_path / "service.yaml"
    path.write_text((REPO / "examples" / "service.yaml").read_text())
    monkeypatch.delenv(cli.API_KEY_ENV, raising=False)
    assert cli_service.service_config_from_args(serve_args("--config", str(path))).serve.api_key is None
    monkeypatch.setenv(cli.API_KEY_ENV, "from-env")
    config = cli_service.service_config_from_args(serve_args("--config", str(path)))
    assert config.serve.api_key.get_secret_value() == "from-env"  # in the config: replicas elsewhere get it too
    config = cli_service.service_config_from_args(serve_args("--config", str(path), "--api-key", "flag", "--num-replicas", "2",
                                                     "--served-model-name", "tiny"))
    assert config.serve.api_key.get_secret_value() == "flag"
    assert (config.serve.num_replicas, config.serve.model_name) == (2, "tiny")


def test_bench_kernel_without_a_gpu_is_one_line_not_a_traceback():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as info:
        main(["bench", "kernel", "--shapes", "olmoe", "--tokens", "16"])
    assert "needs a CUDA GPU" in str(info.value.code)


# ---- status / plot -------------------------------------------------------------------------------
def test_status_and_plot_from_a_saved_report(tmp_path, capsys):
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(report_with_rebalance()))
    assert main(["status", "--json", str(path)]) == 0
    assert "placement v1" in capsys.readouterr().out
    assert main(["plot", "--json", str(path), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == list(PLOTS) and all(Path(p).stat().st_size > 10_000 for p in printed)
    assert main(["plot", "--json", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err


class _PlacementService(BaseHTTPRequestHandler):
    """GET /v1/placement behind a Bearer key, as the service answers it."""

    report: dict = {}
    api_key = "secret"

    def do_GET(self):  # noqa: N802 - the http.server interface
        if self.headers.get("Authorization") != f"Bearer {self.api_key}":
            self._answer(401, {"error": {"message": "invalid API key", "type": "authentication_error",
                                         "param": None, "code": "invalid_api_key"}})
        elif self.path == "/v1/placement":
            self._answer(200, self.report)
        else:
            self._answer(404, {"error": {"message": f"no route {self.path}", "type": "not_found", "param": None,
                                         "code": None}})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture()
def placement_service():
    _PlacementService.report = report_with_rebalance()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PlacementService)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_status_asks_the_service_with_the_api_key(placement_service, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.API_KEY_ENV, raising=False)
    assert main(["status", "--url", placement_service]) == 1
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "needs an API key" in err
    assert main(["status", "--url", placement_service, "--api-key", "secret", "--save", str(tmp_path / "p.json")]) == 0
    assert "placement v1" in capsys.readouterr().out
    assert json.loads((tmp_path / "p.json").read_text())["placement_version"] == 1
    monkeypatch.setenv(cli.API_KEY_ENV, "wrong")
    assert main(["status", "--url", placement_service]) == 1
    assert "needs a valid API key" in capsys.readouterr().err
    monkeypatch.setenv(cli.API_KEY_ENV, "secret")
    assert main(["status", "--url", placement_service + "/"]) == 0


def test_status_names_a_service_that_is_not_there(capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["status", "--url", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach" in err and "moeray serve" in err


def test_entry_point_help_lists_the_new_commands():
    done = subprocess.run([sys.executable, "-m", "moeray.cli", "--help"], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ})
    assert done.returncode == 0
    for command in ("status", "plot", "serve", "validate-config", "demo", "bench"):
        assert command in done.stdout

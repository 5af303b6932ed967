"""The scripts in examples/ run (on the session's local cluster, CPU workers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cluster_job_runs_on_a_local_cluster(ray_cluster, tmp_path):
    job = _load("cluster_job")
    out = job.main(["--device", "cpu", "--workers", "2", "--experts", "8", "--top-k", "2", "--hidden", "32",
                    "--ffn", "48", "--layers", "2", "--redundant-slots", "1", "--requests", "12", "--max-tokens", "8",
                    "--phases", "2", "--random-checkpoint-dir", str(tmp_path / "ckpt")])
    assert out["generated_tokens"] == 2 * 12 * 8
    assert (tmp_path / "ckpt" / "config.json").exists()


def test_quickstart_runs(ray_cluster, capsys):
    _load("quickstart").main()
    printed = capsys.readouterr().out
    assert "placement v1 (staged v1)" in printed and "length" in printed

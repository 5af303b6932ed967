"""Small builders shared by the tests: tiny random checkpoints and valid placements."""

from __future__ import annotations

import numpy as np
import torch

from moeray.config import ModelConfig, tiny_model_config
from moeray.models.checkpoint import load_reference_model, save_checkpoint
from moeray.models.moe_model import MoEModel, init_random_
from placement import Placement


def make_checkpoint(tmp_path, seed: int = 0, **model_overrides) -> tuple[str, ModelConfig, MoEModel]:
    cfg = tiny_model_config(**model_overrides)
    path = tmp_path / f"ckpt-{seed}-{abs(hash(cfg.model_dump_json())) % 10**8}"
    save_checkpoint(init_random_(MoEModel(cfg), seed), path)
    return str(path), cfg, load_reference_model(path)


def reference_logits(model: MoEModel, ids_T: np.ndarray) -> np.ndarray:
    return model(torch.as_tensor(np.asarray(ids_T, dtype=np.int64))).numpy()


def max_rel_error(got: np.ndarray, want: np.ndarray) -> float:
    scale = max(float(np.abs(want).max()), 1e-30)
    return float(np.abs(got - want).max()) / scale


def random_replicated_placement(num_layers, num_experts, num_workers, slots_per_worker, seed=0) -> Placement:
    """Every expert once (shuffled), then free slots filled with extra replicas, never two copies
    of one expert on one worker, different in every layer."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_layers):
        row = np.full(num_workers * slots_per_worker, -1, dtype=np.int64)
        slots = rng.permutation(len(row))[:num_experts]
        row[slots] = rng.permutation(num_experts)
        for slot in np.nonzero(row < 0)[0]:
            w = slot // slots_per_worker
            held = set(row[w * slots_per_worker:(w + 1) * slots_per_worker].tolist())
            choices = [e for e in range(num_experts) if e not in held]
            if choices:
                row[slot] = rng.choice(choices)
        rows.append(row)
    return Placement(np.stack(rows), num_experts, slots_per_worker).validate()


def results_from_triton_interpreter(script: str) -> dict:
    """Run `script` (a test module whose __main__ prints one JSON line) under TRITON_INTERPRET=1 in
    a subprocess: the flag must be set before triton compiles anything, and setting it in this
    process would leak into GPU tests of the same session."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    pytest.importorskip("triton")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, script], env=env, cwd=repo, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

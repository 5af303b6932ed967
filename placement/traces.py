"""Real expert-load traces (read from a directory, never copied) and a calibrated synthetic generator.

Shapes:
    L  MoE layers    E  logical experts    T  tokens in a batch    K  experts per token

Formats (see ../shared/traces/README.md):
  deepseek_v3_sglang_expert_counts.json   {"workloads": {name: int[61][256]}}; layers 0-2 dense
  olmoe_mixtral_domain_expert_counts.json {"models": {model: {"domains": {d: {"top_k": [[..]]}}}}}

A `Trace` is a name plus workloads {name: load_LE}; all workloads of a trace share [L, E].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEEPSEEK_FILE = "deepseek_v3_sglang_expert_counts.json"
OLMOE_MIXTRAL_FILE = "olmoe_mixtral_domain_expert_counts.json"


@dataclass(frozen=True)
class Trace:
    name: str
    workloads: dict  # {workload name: load_LE float64}
    top_k: int

    @property
    def shape(self) -> tuple[int, int]:
        return next(iter(self.workloads.values())).shape


def default_traces_dir() -> Path | None:
    """`../shared/traces` relative to the repository root, when it exists."""
    candidate = Path(__file__).resolve().parent.parent.parent / "shared" / "traces"
    return candidate if candidate.is_dir() else None


def _resolve(path) -> Path:
    resolved = Path(path) if path is not None else default_traces_dir()
    if resolved is None or not resolved.is_dir():
        raise FileNotFoundError(f"no traces directory at {path if path is not None else '../shared/traces'}")
    return resolved


def load_deepseek(path=None) -> Trace:
    """DeepSeek-V3 counts of every workload, MoE layers only: each [58, 256]."""
    data = json.loads((_resolve(path) / DEEPSEEK_FILE).read_text())
    workloads = {}
    for name, rows in data["workloads"].items():
        load = np.asarray(rows, dtype=np.float64)
        workloads[name] = load[load.sum(axis=1) > 0]  # drop the dense layers (all-zero rows)
    return Trace("deepseek-v3", workloads, top_k=8)


def load_olmoe_mixtral(path=None, model: str = "olmoe", counts: str = "top_k") -> Trace:
    """Per-domain counts [3, E] at layers 0, 7, 15 of `model` (olmoe, olmoe-sft, olmoe-dpo, mistral)."""
    data = json.loads((_resolve(path) / OLMOE_MIXTRAL_FILE).read_text())
    entry = data["models"][model]
    workloads = {d: np.asarray(v[counts], dtype=np.float64) for d, v in entry["domains"].items()}
    name = "mixtral-8x7b" if model == "mistral" else model
    return Trace(name, workloads, top_k=int(entry["top_k"]) if counts == "top_k" else 1)


def real_traces(path=None) -> list[Trace]:
    """Every real trace found under `path` (default ../shared/traces); [] when there is none."""
    try:
        root = _resolve(path)
    except FileNotFoundError:
        return []
    found = []
    if (root / DEEPSEEK_FILE).exists():
        found.append(load_deepseek(root))
    if (root / OLMOE_MIXTRAL_FILE).exists():
        found.extend([load_olmoe_mixtral(root, "olmoe"), load_olmoe_mixtral(root, "mistral")])
    return found


# ---- calibration and synthesis ----------------------------------------------------------------


@dataclass(frozen=True)
class TraceShape:
    """Statistics a generator should reproduce."""

    log_sigma: float  # median over layers of std(log(load / mean))
    hottest_over_mean: float  # median over layers of max / mean
    drift_correlation: float  # median Pearson r between workloads' load vectors (same layer)


def measure(trace: Trace) -> TraceShape:
    loads = list(trace.workloads.values())
    sigmas, hottest, correlations = [], [], []
    for load in loads:
        norm = load / load.mean(axis=1, keepdims=True)
        sigmas.append(np.std(np.log(np.maximum(norm, 1e-3)), axis=1))
        hottest.append(norm.max(axis=1))
    for i in range(len(loads)):
        for j in range(i + 1, len(loads)):
            for a, b in zip(loads[i], loads[j]):
                correlations.append(np.corrcoef(a, b)[0, 1])
    return TraceShape(
        float(np.median(np.concatenate(sigmas))),
        float(np.median(np.concatenate(hottest))),
        float(np.median(correlations)) if correlations else 1.0,
    )


@dataclass(frozen=True)
class SyntheticConfig:
    """Defaults calibrated on the DeepSeek-V3 counts (sigma ~0.56-0.86, prefill/decode r ~0.72)."""

    num_layers: int = 58
    num_experts: int = 256
    num_phases: int = 4
    log_sigma: float = 0.7
    drift_correlation: float = 0.85  # of log-popularity between phases; gives load r ~0.7 (prefill vs decode)
    tokens_per_phase: float = 4e6
    top_k: int = 8


def synthetic_trace(config: SyntheticConfig = SyntheticConfig(), seed: int = 0) -> Trace:
    """Log-normal popularity per layer; each phase mixes a shared component with its own so
    phases' log-popularities correlate at `drift_correlation`; counts are multinomial draws."""
    rng = np.random.default_rng(seed)
    shape = (config.num_layers, config.num_experts)
    shared = rng.standard_normal(shape)
    rho = config.drift_correlation
    workloads = {}
    for phase in range(config.num_phases):
        z = rho * shared + np.sqrt(1 - rho**2) * rng.standard_normal(shape) if phase else shared
        popularity = np.exp(config.log_sigma * z)
        probs = popularity / popularity.sum(axis=1, keepdims=True)
        picks = int(config.tokens_per_phase * config.top_k)
        workloads[f"phase{phase}"] = np.stack([rng.multinomial(picks, p) for p in probs]).astype(np.float64)
    return Trace("synthetic", workloads, config.top_k)


def sample_batch_ids(load_E: np.ndarray, num_tokens: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """[T, K] expert ids of one batch: each (token, k) pick drawn from the load distribution."""
    probs = np.asarray(load_E, dtype=np.float64)
    probs = probs / probs.sum()
    return rng.choice(len(probs), size=(num_tokens, top_k), p=probs)


def noisy(load_LE: np.ndarray, relative: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative noise: load * (1 + relative * N(0, 1)), clipped at 0."""
    return np.maximum(load_LE * (1 + relative * rng.standard_normal(load_LE.shape)), 0.0)

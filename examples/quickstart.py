"""The README's tour as a script: a small random MoE model on 4 local CPU workers (Gloo).

    python examples/quickstart.py
"""

from __future__ import annotations

import tempfile

import numpy as np

from moeray.config import EngineConfig, ParallelConfig, tiny_model_config
from moeray.engine import Engine
from moeray.models.checkpoint import save_checkpoint
from moeray.models.moe_model import MoEModel, init_random_


def main() -> None:
    cfg = tiny_model_config(num_experts=8, top_k=2)  # pydantic: bad values are named
    with tempfile.TemporaryDirectory(prefix="moeray-quickstart-") as ckpt:
        save_checkpoint(init_random_(MoEModel(cfg), seed=0), ckpt)  # safetensors, per-expert tensors
        config = EngineConfig(model=cfg, parallel=ParallelConfig(num_workers=4, redundant_slots_per_worker=1))
        with Engine(config, ckpt) as engine:  # starts a local Ray cluster if none is running
            logits = engine.step(np.arange(100))  # every worker takes its share
            print("logits", logits.shape)
            print("routed pairs per expert, layer 0:", engine.load()[0])
            print("imbalance per layer (max/mean worker load):", engine.imbalance().round(3))
            staged = engine.rebalance(force=True)  # plan + stage v+1 while serving...
            engine.step(np.arange(100))  # ...committed at this step boundary
            print(f"placement v{engine.placement().version} (staged v{staged}), "
                  f"{len(engine.stats()['rebalances'])} rebalance(s)")


if __name__ == "__main__":
    main()

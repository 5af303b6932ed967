"""The offline API, shaped like vLLM's so users can switch with little change:

    from moeray import LLM, SamplingParams
    with LLM(model="path/to/hf_dir", num_workers=3, device="cpu", dtype="float32",
             redundant_slots_per_worker=1) as llm:
        outs = llm.generate(["some text", [1, 2, 3]], SamplingParams(max_tokens=32, temperature=0.0))
        outs[0].outputs[0].token_ids, outs[0].outputs[0].text, outs[0].outputs[0].finish_reason

Rebalancing, statistics, placement and recovery stay reachable (`llm.rebalance()`, `llm.stats()`,
`llm.placement()`, `llm.engine`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from moeray.config import EngineConfig, EngineOptions
from moeray.engine import Engine
from moeray.generation.driver import GenerationDriver
from moeray.generation.outputs import RequestOutput
from moeray.generation.sampling import SamplingParams
from moeray.generation.tokenizer import Tokenizer
from moeray.models.checkpoint import check_checkpoint


def _is_single_prompt(prompts) -> bool:
    if isinstance(prompts, str):
        return True
    return isinstance(prompts, (list, tuple, np.ndarray)) and len(prompts) > 0 and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompts)


def engine_config_for(model: str, options: EngineOptions | None = None) -> EngineConfig:
    """EngineConfig for an HF checkpoint directory: its config.json (checked from the headers,
    before anything starts) with the options' runtime choices."""
    options = options or EngineOptions()
    model_cfg = check_checkpoint(model)
    if options.dtype is not None:
        model_cfg = type(model_cfg).model_validate({**model_cfg.model_dump(), "dtype": options.dtype})
    return EngineConfig(model=model_cfg, **options.model_dump(exclude={"dtype"}))


class LLM:
    def __init__(self, model: str, num_workers: int = 1, device: str = "cpu", dtype: str | None = None,
                 redundant_slots_per_worker: int = 0, seed: int = 0, *, parallel: dict | None = None,
                 cache: dict | None = None, stats: dict | None = None, rebalance: dict | None = None,
                 tier: dict | None = None, placement=None):
        par = dict(num_workers=num_workers, device=device, redundant_slots_per_worker=redundant_slots_per_worker)
        options = EngineOptions(dtype=dtype, seed=seed, parallel={**par, **(parallel or {})}, cache=cache or {},
                                stats=stats or {}, rebalance=rebalance or {}, tier=tier or {})
        config = engine_config_for(model, options)
        self.tokenizer = Tokenizer.from_dir(model)
        self.engine = Engine(config, model, placement=placement)
        self.driver = GenerationDriver(self.engine, self.tokenizer)

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for one prompt or a list (text or token ids); outputs in prompt order.

        Every prompt is checked before any is queued: a bad one raises ValueError naming it and
        nothing runs.
        """
        if _is_single_prompt(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        if not all(isinstance(p, SamplingParams) for p in params):
            raise TypeError("sampling_params must be a SamplingParams or a list of them")
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            try:
                self.driver.check_request(prompt, sp)
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from None
        ids = [self.driver.add_request(p, sp) for p, sp in zip(prompts, params)]
        done = self.driver.run_to_completion(ids)
        return [done[rid] for rid in ids]

    def prompt_logits(self, prompts) -> list[np.ndarray]:
        """[T, V] logits of every position of each prompt (scoring; equality checks)."""
        if _is_single_prompt(prompts):
            prompts = [prompts]
        return self.driver.prompt_logits(list(prompts))

    # ---- the engine beneath -------------------------------------------------------------------
    def rebalance(self, force: bool = True, placement=None) -> int | None:
        """Plan and stage v+1 now (committed at the next step); `placement`: stage this
        placement.Placement instead of the planner's (Engine.rebalance)."""
        return self.engine.rebalance(force=force, placement=placement)

    def stats(self) -> dict:
        return self.engine.stats()

    def scale(self, num_workers: int) -> dict:
        """Change the worker count now (requests in flight carry on; see GenerationDriver.scale)."""
        return self.driver.scale(num_workers)

    def placement(self):
        return self.engine.placement()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

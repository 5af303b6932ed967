"""Every model family on the engine (local Ray cluster, CPU workers on Gloo) equals `transformers`.

For each family a tiny random model is built and saved by transformers itself (tests/hf_models.py).
The engine loads that directory and must give:
- the same logits (fp32, max relative error <= 1e-4) for prompts of different lengths batched in
  one step, with 1, 2 and 3 workers and with replicas in the placement;
- token-for-token the same greedy generation (32 tokens) as transformers' `generate` for each
  prompt alone, with 4 prompts of different lengths batched and arriving at different steps;
- both before, during (a forced migration committed mid-generation) and after a migration.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("transformers")

from moeray.generation.sampling import SamplingParams  # noqa: E402
from moeray.llm import LLM  # noqa: E402
from moeray.models.checkpoint import check_checkpoint  # noqa: E402
from tests.helpers import max_rel_error, random_replicated_placement  # noqa: E402
from tests.hf_models import FAMILIES, hf_checkpoint, hf_greedy, hf_logits  # noqa: E402

PROMPTS = [[5, 17, 33, 2 + 7, 100, 250, 3], [42], list(range(60, 60 + 23)), [7, 7, 7, 7, 300, 301, 302, 11, 12, 13, 1]]
GENERATE = 32

# (family, workers, redundant slots per worker, replicated placement)
CASES = [(family, 3, 1, True) for family in FAMILIES] + [
    ("mixtral", 1, 0, False), ("mixtral", 2, 0, False), ("qwen3_moe", 2, 1, True)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (directory, transformers model, reference logits per prompt, reference greedy per prompt)."""
    out = {}
    for i, family in enumerate(FAMILIES):
        ckpt, model = hf_checkpoint(family, tmp_path_factory.mktemp(family), seed=11 + i)
        out[family] = (ckpt, [hf_logits(model, p) for p in PROMPTS], [hf_greedy(model, p, GENERATE) for p in PROMPTS])
    return out


def _llm(ckpt: str, workers: int, redundant: int, replicated: bool) -> LLM:
    placement = None
    if replicated:
        cfg = check_checkpoint(ckpt)
        spw = math.ceil(cfg.num_experts / workers) + redundant
        placement = random_replicated_placement(cfg.num_moe_layers, cfg.num_experts, workers, spw, seed=7)
        assert placement.logcnt.max() > 1, "the case must exercise replicas"
    return LLM(ckpt, num_workers=workers, redundant_slots_per_worker=redundant, placement=placement,
               parallel={"collective_timeout_s": 30}, rebalance={"enabled": False}, cache={"block_size": 4})


def _staggered_greedy(llm: LLM) -> list[list[int]]:
    """The 4 prompts join at steps 0, 0, 1 and 3 (continuous batching), all greedy."""
    driver = llm.driver
    params = SamplingParams(max_tokens=GENERATE, temperature=0.0)
    arrivals = {0: [0, 1], 1: [2], 3: [3]}
    ids: dict[int, str] = {}
    done = {}
    step = 0
    while len(done) < len(PROMPTS):
        for p in arrivals.get(step, []):
            ids[p] = driver.add_request(PROMPTS[p], params)
        for out in driver.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
    return [done[ids[p]] for p in range(len(PROMPTS))]


@pytest.mark.parametrize("family,workers,redundant,replicated", CASES,
                         ids=[f"{f}-{w}w{'-replicas' if r else ''}" for f, w, _, r in CASES])
def test_engine_equals_transformers(family, workers, redundant, replicated, checkpoints, ray_cluster):
    ckpt, want_logits, want_greedy = checkpoints[family]
    with _llm(ckpt, workers, redundant, replicated) as llm:
        got = llm.prompt_logits(PROMPTS)  # all four prompts prefilled in one step
        for p, (g, w) in enumerate(zip(got, want_logits)):
            assert g.shape == w.shape
            assert max_rel_error(g, w) <= 1e-4, f"{family} prompt {p}: {max_rel_error(g, w):.2e}"
        assert _staggered_greedy(llm) == want_greedy

        # A forced migration: staged now, committed at the next step, mid-generation.
        params = SamplingParams(max_tokens=GENERATE, temperature=0.0)
        request_ids = [llm.driver.add_request(p, params) for p in PROMPTS]
        for _ in range(5):
            llm.driver.step()
        version = llm.engine.placement().version
        assert llm.rebalance(force=True) == version + 1
        outs = llm.driver.run_to_completion(request_ids)
        assert llm.engine.placement().version == version + 1
        assert [list(outs[r].outputs[0].token_ids) for r in request_ids] == want_greedy
        after = llm.prompt_logits(PROMPTS)
        assert max(max_rel_error(g, w) for g, w in zip(after, want_logits)) <= 1e-4

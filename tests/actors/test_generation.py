"""Generation on the engine (local Ray cluster, 2 CPU workers, the built-in tiny model with its
tokenizer): sampling, stops, the KV budget, bad input, and recovery with requests in flight."""

from __future__ import annotations

import time

import pytest
import ray
from pydantic import ValidationError

from moeray.errors import CheckpointError
from moeray.generation.reference import greedy_generate
from moeray.generation.sampling import SamplingParams
from moeray.llm import LLM
from tests.helpers import make_checkpoint

PROMPTS = ["The experts of a mixture", "Ray", "Balance the load while serving many requests at once", "é日本"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gen"), seed=3, family="qwen3_moe", num_experts=7, top_k=3)


@pytest.fixture(scope="module")
def llm(tiny, ray_cluster):
    ckpt, _, _ = tiny
    with LLM(ckpt, num_workers=2, redundant_slots_per_worker=1, parallel={"collective_timeout_s": 20},
             rebalance={"enabled": False}, cache={"block_size": 8, "max_model_len": 96}) as llm:
        yield llm


def test_text_in_text_out_greedy_equals_reference(llm, tiny):
    _, cfg, reference = tiny
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0))
    for out in outs:
        completion = out.outputs[0]
        want = greedy_generate(reference, list(out.prompt_token_ids), 12, cfg.eos_token_ids)
        assert list(completion.token_ids) == want
        ended_on_eos = completion.finish_reason == "stop"
        shown = want[:-1] if ended_on_eos else want  # EOS ends the text without being part of it
        assert completion.text == llm.tokenizer.decode(shown)
        assert completion.finish_reason in ("stop", "length")


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = llm.generate(PROMPTS[0], params)[0].outputs[0].token_ids
    crowd = [SamplingParams(max_tokens=10, temperature=1.0)] * 3 + [params]
    in_batch = llm.generate(PROMPTS[1:] + PROMPTS[:1], crowd)[-1].outputs[0].token_ids
    assert alone == in_batch
    assert llm.generate(PROMPTS[0], params)[0].outputs[0].token_ids == alone


def test_stop_strings_and_stop_token_ids(llm):
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    full = llm.generate(PROMPTS[2], greedy)[0].outputs[0]
    assert len(full.token_ids) == 16 and full.finish_reason == "length"
    stop_id = full.token_ids[4]
    first = full.token_ids.index(stop_id)
    by_id = llm.generate(PROMPTS[2], greedy.model_copy(update={"stop_token_ids": [stop_id]}))[0].outputs[0]
    assert by_id.token_ids == full.token_ids[:first + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == stop_id
    stop_text = full.text[len(full.text) // 2:][:3]
    assert stop_text.strip(), full.text
    by_text = llm.generate(PROMPTS[2], greedy.model_copy(update={"stop": [stop_text]}))[0].outputs[0]
    assert by_text.text == full.text[:full.text.index(stop_text)]
    assert by_text.finish_reason == "stop" and by_text.stop_reason == stop_text


def test_logprobs_travel_only_when_asked(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2))[0].outputs[0]
    assert len(out.logprobs) == 3
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token and lp.top[0][0] == token and len(lp.top) == 2 and lp.logprob <= 0
    assert llm.generate(PROMPTS[0], SamplingParams(max_tokens=3))[0].outputs[0].logprobs is None


def test_bad_input_is_named_and_the_engine_keeps_serving(llm):
    with pytest.raises(ValueError, match=r"prompt 1: the prompt has 200 tokens; the context holds max_model_len=96"):
        llm.generate([[1, 2, 3], list(range(3, 203))], SamplingParams(max_tokens=4))
    with pytest.raises(ValidationError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match=r"token id 100000 is outside the vocabulary"):
        llm.generate([[1, 100000]])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    assert llm.engine.healthy
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert len(out.outputs[0].token_ids) >= 1


def test_a_small_kv_budget_queues_requests_instead_of_failing(tiny, ray_cluster):
    """Each worker holds 64 tokens of KV: 12 requests of ~40 tokens must take turns, and every one
    completes with the output it gets with room to spare."""
    ckpt, _, _ = tiny
    prompts = [[(7 * i + j) % 300 + 3 for j in range(8 + i)] for i in range(12)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    with LLM(ckpt, num_workers=2, rebalance={"enabled": False},
             cache={"block_size": 8, "kv_tokens_per_worker": 64}) as small:
        driver = small.driver
        ids = [driver.add_request(p, params) for p in prompts]
        done, peak_running = {}, 0
        while len(done) < len(ids):
            for out in driver.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
            assert max(driver.scheduler.kv_usage()) <= 1.0
            peak_running = max(peak_running, len(driver.scheduler.running))
        assert peak_running < len(prompts), "the budget must have queued some requests"
    with LLM(ckpt, num_workers=2, rebalance={"enabled": False}) as roomy:
        want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    assert [done[i] for i in ids] == want


def test_a_bad_checkpoint_is_one_clear_error_before_any_worker_starts(tmp_path, ray_cluster):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel.*MixtralForCausalLM"):
        LLM(str(tmp_path))
    assert time.monotonic() - start < 2.0
    with pytest.raises(CheckpointError, match="config.json"):
        LLM(str(tmp_path / "nowhere"))


def test_requests_in_flight_survive_a_killed_worker(tiny, ray_cluster):
    """A worker dies mid-generation: the driver recovers the engine (the survivor goes on alone, a
    new epoch) and re-runs every request in flight (generated tokens re-prefilled): no request is
    lost and greedy outputs are unchanged."""
    ckpt, cfg, reference = tiny
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    with LLM(ckpt, num_workers=2, parallel={"collective_timeout_s": 5}, rebalance={"enabled": False}) as llm:
        driver = llm.driver
        ids = [driver.add_request(p, params) for p in PROMPTS]
        for _ in range(4):
            driver.step()
        ray.kill(llm.engine.workers[1])
        outs = driver.run_to_completion(ids)
        event = llm.engine.recoveries[-1]
        assert (event["mode"], event["lost_ranks"], event["to_workers"]) == ("shrink", [1], 1)
        assert event["requests_rerun"] == len(ids)
    for rid in ids:
        out = outs[rid]
        want = greedy_generate(reference, list(out.prompt_token_ids), 16)
        assert list(out.outputs[0].token_ids) == want


def test_the_serving_loop_runs_multi_step_requests_and_survives_callers_that_give_up(llm, tiny):
    """The service's EngineLoop (one thread drives the driver) on this engine: concurrent requests of
    many steps all finish with the reference output; a caller that cancels does not stop the loop;
    a bad request is a 400 and the rest still run."""
    import asyncio

    from moeray.serving.core import EngineLoop, RequestRejected

    _, cfg, reference = tiny
    loop = EngineLoop(llm.driver)
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7], [8, 9], list(range(20, 40))]

    async def submit(prompt, sampling):
        stream = await loop.open([prompt], [sampling])
        try:
            return (await stream.final())[0]
        finally:
            stream.close()  # a caller that gives up aborts what has not finished

    async def scenario():
        gone = asyncio.ensure_future(submit([3, 4, 5], SamplingParams(max_tokens=40, ignore_eos=True)))
        await asyncio.sleep(0)
        gone.cancel()
        bad = submit([1, 10**6], params)
        outs = await asyncio.gather(bad, *(submit(p, params) for p in prompts), return_exceptions=True)
        steps = await loop.call(lambda: llm.engine.steps)
        return outs, steps

    try:
        outs, steps = asyncio.run(scenario())
    finally:
        loop.stop()
    assert isinstance(outs[0], RequestRejected) and outs[0].status == 400 and "100000" in outs[0].detail
    for out, prompt in zip(outs[1:], prompts):
        assert list(out.outputs[0].token_ids) == greedy_generate(reference, prompt, 9)
    assert loop.steps >= 9 and steps > 0
    assert not llm.driver.has_unfinished()

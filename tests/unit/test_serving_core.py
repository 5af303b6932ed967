"""The service's framework-free parts: request checks, batching into engine steps, responses."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from moeray.serving.core import RequestRejected, StepBatcher, check_request, forward_result, run_batch


class RecordingEngine:
    """A real async step function: returns each request's ids * 10 after `step_s`, and records
    the batches it was given (so tests can see how requests were merged)."""

    def __init__(self, step_s: float = 0.05, fail_on: int | None = None):
        self.step_s, self.fail_on, self.batches = step_s, fail_on, []

    async def __call__(self, ids_list):
        self.batches.append([ids.tolist() for ids in ids_list])
        await asyncio.sleep(self.step_s)
        if self.fail_on is not None and any(self.fail_on in ids for ids in ids_list):
            raise RuntimeError(f"step failed on {self.fail_on}")
        return [ids * 10 for ids in ids_list]


def test_requests_arriving_during_a_step_ride_the_next_one_together():
    async def scenario():
        engine = RecordingEngine()
        batcher = StepBatcher(engine, max_requests=16, max_tokens=1000, wait_s=0.0)
        first = asyncio.ensure_future(batcher.submit(np.array([1])))
        await asyncio.sleep(0.01)  # the first step is running now
        rest = [asyncio.ensure_future(batcher.submit(np.array([i, i]))) for i in range(2, 12)]
        results = await asyncio.gather(first, *rest)
        return engine.batches, results, batcher

    batches, results, batcher = asyncio.run(scenario())
    assert batches[0] == [[1]]
    assert batches[1] == [[i, i] for i in range(2, 12)]  # all ten, in arrival order, one step
    assert [r.tolist() for r in results] == [[10]] + [[10 * i, 10 * i] for i in range(2, 12)]
    assert (batcher.steps, batcher.requests, batcher.largest, batcher.tokens) == (2, 11, 10, 21)


def test_limits_on_requests_and_tokens_per_step():
    async def scenario(max_requests, max_tokens):
        engine = RecordingEngine(step_s=0.01)
        batcher = StepBatcher(engine, max_requests=max_requests, max_tokens=max_tokens, wait_s=0.05)
        sizes = [3, 3, 3, 9, 1]
        await asyncio.gather(*[batcher.submit(np.full(n, i)) for i, n in enumerate(sizes)])
        return [[len(ids) for ids in batch] for batch in engine.batches]

    assert asyncio.run(scenario(2, 1000)) == [[3, 3], [3, 9], [1]]
    # 7 tokens per step: the 9-token request does not fit with others and runs alone
    assert asyncio.run(scenario(16, 7)) == [[3, 3], [3], [9], [1]]


def test_a_failed_step_fails_its_requests_only():
    async def scenario():
        engine = RecordingEngine(step_s=0.02, fail_on=666)
        batcher = StepBatcher(engine, max_requests=16, max_tokens=1000, wait_s=0.01)
        bad = await asyncio.gather(batcher.submit(np.array([1])), batcher.submit(np.array([666])),
                                   return_exceptions=True)
        good = await batcher.submit(np.array([2]))
        return bad, good

    bad, good = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) and "666" in str(r) for r in bad)
    assert good.tolist() == [20]


def test_batcher_rejects_bad_limits():
    with pytest.raises(ValueError, match="max_requests=0"):
        StepBatcher(RecordingEngine(), max_requests=0, max_tokens=10, wait_s=0.0)


def test_check_request_names_the_bad_value():
    assert check_request([0, 5, 9], vocab_size=10, max_tokens=8).tolist() == [0, 5, 9]
    with pytest.raises(RequestRejected, match=r"token id 10 is outside the vocabulary \[0, 10\)") as err:
        check_request([1, 10], vocab_size=10, max_tokens=8)
    assert err.value.status == 400
    with pytest.raises(RequestRejected, match=r"token id 100000000000000000000 is outside") as err:
        check_request([1, 10**20], vocab_size=10, max_tokens=8)  # does not fit int64
    assert err.value.status == 400
    with pytest.raises(RequestRejected, match="9 tokens > max_tokens_per_request=8") as err:
        check_request(list(range(9)), vocab_size=10, max_tokens=8)
    assert err.value.status == 413


def test_run_batch_splits_one_step_back_per_request():
    def step(ids):
        return np.stack([ids, -ids], axis=1).astype(float)

    outs = run_batch(step, [np.array([1, 2]), np.array([3]), np.array([4, 5, 6])])
    assert [o.tolist() for o in outs] == [[[1, -1], [2, -2]], [[3, -3]], [[4, -4], [5, -5], [6, -6]]]


def test_forward_result_greedy_and_log_probabilities():
    logits = np.array([[0.0, 2.0, 1.0], [5.0, 5.0, -1.0]])
    res = forward_result(logits, top_logprobs=2)
    assert res.next_token_ids == [1, 0]
    want = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert [t for t, _ in res.top_logprobs[0]] == [1, 2] and [t for t, _ in res.top_logprobs[1]] == [0, 1]
    np.testing.assert_allclose([lp for _, lp in res.top_logprobs[0]], want[0, [1, 2]])
    assert forward_result(logits, 0).top_logprobs is None

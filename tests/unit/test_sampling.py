"""SamplingParams validation; Sampler against its float64 reference and against the filter's definition."""

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from moeray.generation.sampling import Sampler, SamplingParams, TokenLogprobs, reference_probs, sample_reference


# ---- SamplingParams -------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, shown", [
    ("max_tokens", 0, "0"), ("max_tokens", "5", "'5'"), ("max_tokens", 5.5, "5.5"), ("max_tokens", True, "True"),
    ("temperature", -0.5, "-0.5"), ("temperature", float("nan"), "nan"), ("temperature", float("inf"), "inf"),
    ("temperature", "1.0", "'1.0'"), ("temperature", True, "True"),
    ("top_p", 0.0, "0.0"), ("top_p", 1.5, "1.5"), ("top_p", float("nan"), "nan"), ("top_p", -float("inf"), "-inf"),
    ("top_k", -2, "-2"), ("top_k", 2.0, "2.0"), ("top_k", False, "False"),
    ("seed", 1.5, "1.5"), ("seed", -1, "-1"), ("seed", "7", "'7'"),
    ("stop", [""], "['']"), ("stop", ["ok", ""], "['ok', '']"), ("stop", [3], "3"), ("stop", 3, "3"),
    ("stop_token_ids", [-1], "-1"), ("stop_token_ids", ["2"], "'2'"), ("stop_token_ids", [2.0], "2.0"),
    ("ignore_eos", "yes", "'yes'"), ("ignore_eos", 1, "1"),
    ("logprobs", 21, "21"), ("logprobs", -1, "-1"), ("logprobs", 1.0, "1.0"),
])
def test_bad_params_name_the_field_and_the_value(field, value, shown):
    with pytest.raises(ValidationError) as err:
        SamplingParams(**{field: value})
    message = str(err.value)
    assert field in message and shown in message, message


def test_unknown_field_is_rejected():
    with pytest.raises(ValidationError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=4)


def test_defaults_coercions_and_frozen():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.stop_token_ids, p.ignore_eos,
            p.logprobs) == (16, 1.0, 1.0, -1, None, [], [], False, None)
    q = SamplingParams(temperature=2, stop="END", top_k=0, logprobs=0, seed=2**64 - 1)
    assert isinstance(q.temperature, float) and q.temperature == 2.0
    assert q.stop == ["END"]
    with pytest.raises(ValidationError):
        q.max_tokens = 3


@pytest.mark.parametrize("kwargs, greedy", [
    ({"temperature": 0.0}, True), ({"top_k": 1}, True), ({"temperature": 0, "top_k": 5}, True),
    ({}, False), ({"temperature": 1e-6}, False), ({"top_k": 2}, False), ({"top_p": 1e-9}, False),
])
def test_greedy_property(kwargs, greedy):
    assert SamplingParams(**kwargs).greedy is greedy


# ---- greedy, seeds -------------------------------------------------------------------------

def test_greedy_rows_are_argmax_with_ties_to_the_lowest_id():
    logits_BV = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -3.0, -0.5]])
    ids, logprobs = Sampler().sample(logits_BV, [SamplingParams(temperature=0)] * 2 + [SamplingParams(top_k=1)],
                                     [None] * 3)
    assert ids == [1, 0, 3]
    assert logprobs == [None, None, None]


def _seeded_run(sampler, logits_per_step, row, batch_params, seed_params):
    """Tokens the seeded request draws over several steps while sitting at `row` among `batch_params`."""
    params = list(batch_params)
    params.insert(row, seed_params)
    generators = [sampler.generator_for(p) for p in params]
    out = []
    for logits_V in logits_per_step:
        logits_BV = torch.randn(len(params), logits_V.numel(), generator=torch.Generator().manual_seed(len(out)))
        logits_BV[row] = logits_V
        ids, _ = sampler.sample(logits_BV, params, generators)
        out.append(ids[row])
    return out


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    steps = [torch.randn(64, generator=torch.Generator().manual_seed(100 + i)) for i in range(12)]
    seeded = SamplingParams(seed=1234, temperature=1.3)
    alone = _seeded_run(Sampler(seed=0), steps, 0, [], seeded)
    assert alone == _seeded_run(Sampler(seed=0), steps, 0, [], seeded)
    others = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(seed=99), SamplingParams(top_p=0.5)]
    assert alone == _seeded_run(Sampler(seed=5), steps, 2, others, seeded)
    assert alone == _seeded_run(Sampler(seed=6), steps, 4, others[::-1], seeded)
    # and the seed matters: another seed gives another sequence (12 draws near-uniform over 64 ids)
    assert alone != _seeded_run(Sampler(seed=0), steps, 0, [], SamplingParams(seed=4321, temperature=1.3))


def test_generator_for_without_seed_is_none():
    assert Sampler().generator_for(SamplingParams()) is None
    assert isinstance(Sampler().generator_for(SamplingParams(seed=1)), torch.Generator)


# ---- the filter -----------------------------------------------------------------------------

def _draw_many(sampler, logits_V, params, n):
    """n draws for one row of logits, as one batched call over n identical rows (shared generator)."""
    ids, _ = sampler.sample(logits_V.expand(n, -1).contiguous(), [params] * n, [None] * n)
    return np.array(ids)


def test_top_k_is_respected():
    logits_V = torch.randn(50, generator=torch.Generator().manual_seed(3))
    top5 = set(torch.topk(logits_V, 5).indices.tolist())
    drawn = _draw_many(Sampler(seed=1), logits_V, SamplingParams(top_k=5, temperature=3.0), 5000)
    assert set(drawn.tolist()) == top5  # nothing outside; with temperature 3 each of the 5 shows up


def test_top_p_is_respected():
    probs = torch.tensor([0.05, 0.4, 0.02, 0.3, 0.13, 0.1])
    # sorted: 0.4 (id 1), 0.3 (id 3), 0.13 (id 4), 0.1 (id 5)...; 0.4 + 0.3 < 0.75 <= 0.4 + 0.3 + 0.13
    drawn = _draw_many(Sampler(seed=2), probs.log(), SamplingParams(top_p=0.75), 5000)
    assert set(drawn.tolist()) == {1, 3, 4}


def test_empirical_frequencies_match_the_filtered_distribution():
    logits_V = torch.tensor([0.12, 0.3, 0.05, 0.25, 0.08, 0.2]).log()
    params = SamplingParams(temperature=0.9, top_k=4, top_p=0.7)  # keeps ids 1, 3, 5
    expected = reference_probs(logits_V.numpy(), params)
    assert (expected > 0).tolist() == [False, True, False, True, False, True]  # both filters cut something
    n = 20_000
    freq = np.bincount(_draw_many(Sampler(seed=7), logits_V, params, n), minlength=6) / n
    # a frequency's standard deviation is <= sqrt(0.25 / n) = 0.0035: 0.015 is > 4 sigma
    bound = 0.015
    assert np.abs(freq - expected).max() < bound, (freq, expected)
    assert (freq[expected == 0] == 0).all()
    # the bound discriminates: the unfiltered softmax is far outside it
    unfiltered = torch.softmax(logits_V.double() / 0.9, 0).numpy()
    assert np.abs(unfiltered - expected).max() > 3 * bound


AWKWARD = [
    (1, 1, SamplingParams()),
    (1, 1, SamplingParams(top_p=1e-9, top_k=3)),
    (3, 4, SamplingParams(top_k=10)),
    (2, 7, SamplingParams(top_p=1e-9)),
    (2, 7, SamplingParams(temperature=1e-4)),
    (2, 7, SamplingParams(temperature=1e-30)),
    (4, 33, SamplingParams(temperature=0.5, top_k=4, top_p=0.8)),
    (8, 1000, SamplingParams(temperature=1.7, top_p=0.95)),
    (8, 1000, SamplingParams(temperature=0.3, top_k=50, top_p=0.6)),
    (2, 5, SamplingParams(temperature=0)),
]


@pytest.mark.parametrize("B, V, params", AWKWARD)
def test_fast_filtered_probs_equal_the_reference(B, V, params):
    logits_BV = 3 * torch.randn(B, V, generator=torch.Generator().manual_seed(B * 1000 + V))
    fast_BV = Sampler().filtered_probs(logits_BV, [params] * B).double().numpy()
    ref_BV = np.stack([reference_probs(row, params) for row in logits_BV.numpy()])
    np.testing.assert_allclose(fast_BV, ref_BV, atol=2e-6, rtol=0)
    assert np.allclose(fast_BV.sum(1), 1.0)


def test_fast_filter_with_ties_and_mixed_rows_equals_the_reference():
    logits_BV = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [4.0, 4.0, 1.0, 1.0, 1.0]])
    params = [SamplingParams(top_k=2), SamplingParams(top_k=3, top_p=0.5), SamplingParams(temperature=0)]
    fast_BV = Sampler().filtered_probs(logits_BV, params).double().numpy()
    ref_BV = np.stack([reference_probs(row, p) for row, p in zip(logits_BV.numpy(), params)])
    np.testing.assert_allclose(fast_BV, ref_BV, atol=1e-7)
    np.testing.assert_allclose(ref_BV[0], [0, 0.5, 0.5, 0, 0])  # ties: the lower ids survive top-k
    np.testing.assert_allclose(ref_BV[1], [0.5, 0.5, 0, 0, 0])


def test_draws_come_from_the_reference_support():
    logits_BV = torch.randn(16, 40, generator=torch.Generator().manual_seed(11))
    params = [SamplingParams(top_k=3, temperature=2.0, seed=s) if s % 2 else SamplingParams(top_p=0.3)
              for s in range(16)]
    sampler = Sampler(seed=3)
    ids, _ = sampler.sample(logits_BV, params, [sampler.generator_for(p) for p in params])
    ref_ids, _ = sample_reference(logits_BV, params, [sampler.generator_for(p) for p in params])
    for row, p, fast, ref in zip(logits_BV.numpy(), params, ids, ref_ids):
        support = reference_probs(row, p) > 0
        assert support[fast] and support[ref]


# ---- logprobs -------------------------------------------------------------------------------

def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits_BV = torch.randn(4, 30, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(logprobs=3, temperature=0.2, top_k=4), SamplingParams(),
              SamplingParams(logprobs=0, temperature=0), SamplingParams(logprobs=20, top_p=0.5)]
    ids, logprobs = Sampler(seed=9).sample(logits_BV, params, [None] * 4)
    exact_BV = torch.log_softmax(logits_BV.double(), dim=1)
    assert logprobs[1] is None
    for b in (0, 2, 3):
        lp = logprobs[b]
        assert isinstance(lp, TokenLogprobs) and lp.token_id == ids[b]
        assert math.isclose(lp.logprob, exact_BV[b, ids[b]].item(), abs_tol=1e-5)
        want = torch.sort(exact_BV[b], descending=True)
        assert [t for t, _ in lp.top] == want.indices[:params[b].logprobs].tolist()
        np.testing.assert_allclose([v for _, v in lp.top], want.values[:params[b].logprobs].numpy(), atol=1e-5)
    assert logprobs[2].top == ()
    _, ref_logprobs = sample_reference(logits_BV, params, [torch.Generator().manual_seed(0)] * 4)
    assert [t for t, _ in ref_logprobs[3].top] == [t for t, _ in logprobs[3].top]


def test_logprobs_top_n_larger_than_vocab():
    ids, logprobs = Sampler().sample(torch.tensor([[0.0, 1.0, 2.0]]), [SamplingParams(logprobs=20)], [None])
    assert ids != [] and [t for t, _ in logprobs[0].top] == [2, 1, 0]


def test_shape_mismatch_and_empty_batch():
    with pytest.raises(ValueError, match="2 rows"):
        Sampler().sample(torch.zeros(2, 4), [SamplingParams()], [None])
    assert Sampler().sample(torch.zeros(0, 4), [], []) == ([], [])

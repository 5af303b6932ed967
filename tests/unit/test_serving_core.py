"""The service's framework-free parts: request checks and responses (the engine loop itself runs
in tests/actors/test_serve.py against a real engine)."""

from __future__ import annotations

import numpy as np
import pytest

from moeray.generation.driver import check_token_ids
from moeray.serving.core import RequestRejected, check_request_size, forward_result


def test_token_ids_are_checked_naming_the_bad_value():
    assert check_token_ids([0, 5, 9], vocab_size=10).tolist() == [0, 5, 9]
    with pytest.raises(ValueError, match=r"token id 10 is outside the vocabulary \[0, 10\)"):
        check_token_ids([1, 10], vocab_size=10)
    with pytest.raises(ValueError, match=r"token id 100000000000000000000 is outside"):
        check_token_ids([1, 10**20], vocab_size=10)  # does not fit int64
    with pytest.raises(ValueError, match=r"token id 'a' is outside"):
        check_token_ids([1, "a"], vocab_size=10)


def test_request_size_limit_is_a_413_naming_both_numbers():
    check_request_size(list(range(8)), max_tokens=8)
    with pytest.raises(RequestRejected, match="9 tokens > max_tokens_per_request=8") as err:
        check_request_size(list(range(9)), max_tokens=8)
    assert err.value.status == 413


def test_forward_result_greedy_and_log_probabilities():
    logits = np.array([[0.0, 2.0, 1.0], [5.0, 5.0, -1.0]])
    res = forward_result(logits, top_logprobs=2)
    assert res.next_token_ids == [1, 0]
    want = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert [t for t, _ in res.top_logprobs[0]] == [1, 2] and [t for t, _ in res.top_logprobs[1]] == [0, 1]
    np.testing.assert_allclose([lp for _, lp in res.top_logprobs[0]], want[0, [1, 2]])
    assert forward_result(logits, 0).top_logprobs is None

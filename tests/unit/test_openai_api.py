"""The OpenAI API's rules without a server: body parsing, strict request models naming the bad
field, conversion to SamplingParams, the context check, response shapes (read back by the official
`openai` client's own models), server-sent events."""

from __future__ import annotations

import json

import pytest

from moeray.generation.sampling import SamplingParams, TokenLogprobs
from moeray.serving import openai_api as oa
from moeray.serving import openai_responses as resp


def _error(model, body) -> oa.OpenAIError:
    with pytest.raises(oa.OpenAIError) as err:
        oa.parse_request(model, body)
    assert err.value.status == 400 and err.value.type == "invalid_request_error"
    return err.value


@pytest.mark.parametrize("raw,words", [
    (b"", "empty"), (b"  \n", "empty"), (b"{not json", "not valid JSON"), (b"[1, 2]", "got a JSON array"),
    (b'"text"', "got a JSON str"), (b"\xff\xfe{", "not valid JSON"),
])
def test_a_body_that_is_no_json_object_is_a_400(raw, words):
    with pytest.raises(oa.OpenAIError, match=words) as err:
        oa.parse_json_body(raw)
    assert err.value.status == 400 and err.value.body()["error"]["code"] == "invalid_json"


def test_nan_and_infinity_parse_so_that_the_model_names_their_field():
    body = oa.parse_json_body(b'{"prompt": "x", "temperature": NaN, "top_p": Infinity}')
    err = _error(oa.CompletionRequest, body)
    assert err.param == "temperature" and "finite number" in err.message and "top_p" in err.message


@pytest.mark.parametrize("prompt,want", [
    ("text", ["text"]), ([1, 2, 3], [[1, 2, 3]]), (["a", "b"], ["a", "b"]), ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_the_four_prompt_forms_become_a_list_of_prompts(prompt, want):
    assert oa.parse_request(oa.CompletionRequest, {"prompt": prompt}).prompt == want


@pytest.mark.parametrize("prompt,words", [
    ([1, 2.0], "prompt[1] = 2.0 is not a token id"), ([1, "7"], "prompt[1] = '7'"), ([True], "prompt[0] = True"),
    ([[1], [2, 2.5]], "prompt[1][1] = 2.5"), ([[1], []], "prompt[1] is empty"), ([], "non-empty"),
    (5, "got 5"), ([["a"]], "prompt[0][0] = 'a'"), (["a", 1], "prompt[1] = 1"), ({"a": 1}, "got {'a': 1}"),
])
def test_token_ids_are_strict_integers(prompt, words):
    err = _error(oa.CompletionRequest, {"prompt": prompt})
    assert err.param == "prompt" and words in err.message, err.message


@pytest.mark.parametrize("field,value,words", [
    ("max_tokens", 0, "greater than or equal to 1"), ("max_tokens", "5", "valid integer"),
    ("max_tokens", 5.0, "valid integer"), ("max_tokens", True, "valid integer"),
    ("temperature", -1, "greater than or equal to 0"), ("temperature", "0.5", "valid number"),
    ("top_p", 0, "greater than 0"), ("top_p", 1.01, "less than or equal to 1"), ("top_k", -2, "greater than or equal"),
    ("seed", -1, "greater than or equal to 0"), ("n", 2, "only n=1"), ("echo", True, "not supported"),
    ("logprobs", 21, "less than or equal to 20"), ("stop", [""], "non-empty"), ("stop", 3, "got 3"),
    ("presence_penalty", 0.5, "not supported"), ("stream", 1, "valid boolean"), ("suffix", "x", "not supported"),
    ("stream_options", {"include_usage": True}, "only with stream=true"), ("bogus", 1, "unknown field"),
])
def test_bad_completion_fields_are_named(field, value, words):
    err = _error(oa.CompletionRequest, {"prompt": "x", field: value})
    assert err.param == field and words in err.message, err.message


def test_every_bad_field_is_in_the_message_and_one_is_the_param():
    err = _error(oa.CompletionRequest, {"prompt": "x", "max_tokens": 0, "top_p": 2})
    assert err.param in ("max_tokens", "top_p") and "max_tokens:" in err.message and "top_p:" in err.message
    assert _error(oa.CompletionRequest, {}).message == "prompt: field required"


def test_chat_fields_are_named_down_to_the_message():
    assert _error(oa.ChatCompletionRequest, {"messages": [{"role": "user"}, {"role": "x", "content": "a"}]}
                  ).param == "messages[1].role"
    assert _error(oa.ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "image"}]}]}
                  ).param == "messages[0].content"
    assert _error(oa.ChatCompletionRequest, {"messages": []}).param == "messages"
    assert _error(oa.ChatCompletionRequest, {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 1}
                  ).param == "top_logprobs"
    req = oa.parse_request(oa.ChatCompletionRequest, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 7, "max_tokens": 3})
    assert req.messages[0].content == "ab" and req.requested_max_tokens == 7


def test_requests_become_sampling_params():
    req = oa.parse_request(oa.CompletionRequest, {
        "prompt": "x", "max_tokens": 9, "temperature": 0, "top_p": 0.5, "top_k": 4, "seed": 3, "stop": "\n",
        "stop_token_ids": [2], "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    assert oa.sampling_params(req, req.max_tokens, 2) == SamplingParams(
        max_tokens=9, temperature=0.0, top_p=0.5, top_k=4, seed=3, stop=["\n"], stop_token_ids=[2], ignore_eos=True,
        logprobs=2)
    assert req.include_usage
    default = oa.parse_request(oa.CompletionRequest, {"prompt": "x"})
    assert default.max_tokens == oa.COMPLETION_DEFAULT_MAX_TOKENS and default.stop == [] and not default.include_usage
    with pytest.raises(oa.OpenAIError) as err:  # SamplingParams' own checks name the request's field too
        oa.sampling_params(oa.parse_request(oa.CompletionRequest, {"prompt": "x", "stop_token_ids": [-1]}), 4, None)
    assert err.value.param == "stop_token_ids"


def test_the_context_check_names_max_tokens_and_both_sizes():
    oa.check_context(10, 14, max_model_len=24, max_tokens_per_request=24)
    with pytest.raises(oa.OpenAIError, match=r"holds 24 tokens, but the request needs 25 \(10 in the prompt \+ "
                                             r"max_tokens=15\)") as err:
        oa.check_context(10, 15, max_model_len=24, max_tokens_per_request=100)
    assert (err.value.param, err.value.code) == ("max_tokens", "context_length_exceeded")
    with pytest.raises(oa.OpenAIError, match="max_tokens_per_request=20"):
        oa.check_context(10, 15, max_model_len=100, max_tokens_per_request=20)


def test_errors_have_openai_shape():
    body = oa.OpenAIError(401, "no key", code="invalid_api_key").body()
    assert body == {"error": {"message": "no key", "type": "invalid_request_error", "param": None,
                              "code": "invalid_api_key"}}
    assert oa.OpenAIError(503, "down").type == "server_error"
    assert oa.param_name(("messages", 0, "content")) == "messages[0].content" and oa.param_name(()) is None


# ---- responses --------------------------------------------------------------------------------------

def test_responses_read_back_through_the_openai_clients_models():
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    lps = [TokenLogprobs(5, -0.5, ((5, -0.5), (7, -1.5))), TokenLogprobs(7, -0.1, ((7, -0.1), (5, -2.5)))]
    text = {5: "ab", 7: "c"}.__getitem__
    logprobs = resp.completion_logprobs(lps, text, offset=3)
    assert logprobs.text_offset == [3, 5] and logprobs.top_logprobs[0] == {"ab": -0.5, "c": -1.5}
    usage = resp.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    completion = resp.CompletionResponse(id="cmpl-1", created=1, model="m", usage=usage, choices=[
        resp.CompletionChoice(index=0, text="abc", logprobs=logprobs, finish_reason="length")])
    parsed = Completion.model_validate(completion.model_dump())
    assert parsed.choices[0].logprobs.tokens == ["ab", "c"] and parsed.usage.total_tokens == 5
    chat = resp.ChatCompletionResponse(id="chatcmpl-1", created=1, model="m", usage=usage, choices=[
        resp.ChatChoice(index=0, message=resp.AssistantMessage(content="abc"), finish_reason="stop",
                      logprobs=resp.chat_logprobs(lps, text))])
    parsed_chat = ChatCompletion.model_validate(chat.model_dump())
    assert parsed_chat.choices[0].logprobs.content[0].top_logprobs[1].token == "c"
    assert parsed_chat.choices[0].logprobs.content[1].bytes == [99]
    chunk = resp.ChatCompletionChunk(id="chatcmpl-1", created=1, model="m", choices=[
        resp.ChatChunkChoice(index=0, delta=resp.ChatDelta(role="assistant", content=""))])
    assert ChatCompletionChunk.model_validate(chunk.model_dump()).choices[0].delta.role == "assistant"


def test_server_sent_events_are_data_lines_ending_in_done():
    event = resp.sse({"a": 1})
    assert event == 'data: {"a": 1}\n\n' and resp.SSE_DONE == "data: [DONE]\n\n"
    usage = resp.Usage(prompt_tokens=1, completion_tokens=0, total_tokens=1)
    assert json.loads(resp.sse(usage)[len("data: "):]) == usage.model_dump()

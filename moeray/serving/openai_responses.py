"""The OpenAI-compatible API's response shapes (completion / chat responses and stream chunks,
usage, logprobs) and their server-sent-event framing, without the web framework (unit-tested);
requests, their validation and errors are in moeray.serving.openai_api.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel

from moeray.generation.sampling import TokenLogprobs

SSE_DONE = "data: [DONE]\n\n"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage_of(outputs) -> Usage:
    """Usage summed over the RequestOutputs of one HTTP request."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(o.outputs[0].token_ids) for o in outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A completion, and (the same shape) each streamed chunk of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moeray"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


TokenText = Callable[[int], str]


def completion_logprobs(logprobs: Sequence[TokenLogprobs], token_text: TokenText, offset: int) -> CompletionLogprobs:
    """Legacy completions logprobs; text offsets count from `offset` (the text sent before)."""
    tokens = [token_text(lp.token_id) for lp in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in logprobs],
                              top_logprobs=[{token_text(t): v for t, v in lp.top} for lp in logprobs],
                              text_offset=offsets)


def _top(token_id: int, logprob: float, token_text: TokenText) -> TopLogprob:
    text = token_text(token_id)
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))


def chat_logprobs(logprobs: Sequence[TokenLogprobs], token_text: TokenText) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(**_top(lp.token_id, lp.logprob, token_text).model_dump(),
                         top_logprobs=[_top(t, v, token_text) for t, v in lp.top]) for lp in logprobs])


def sse(event: BaseModel | dict) -> str:
    """One server-sent event carrying a JSON object."""
    data = event.model_dump_json() if isinstance(event, BaseModel) else json.dumps(event)
    return f"data: {data}\n\n"

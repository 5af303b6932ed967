"""The OpenAI-compatible API's shapes and rules, without the web framework (unit-tested).

    parse_json_body(raw)                 the body as a dict whatever the content type (curl -d sends a
                                         form type); 400 for an empty body, bad JSON or a non-object
    parse_request(CompletionRequest, body)   strict pydantic: 400 naming the field; 2.0, "7" and true
                                         are no token ids, NaN / Infinity are no numbers
    sampling_params(request, max_tokens, logprobs)   -> SamplingParams
    OpenAIError -> error_body()          {"error": {"message", "type", "param", "code"}}

The response models, usage, logprobs and SSE framing are in moeray.serving.openai_responses.
Request fields follow OpenAI's names and defaults (max_tokens 16 for completions); vLLM's extras
`top_k`, `ignore_eos` and `stop_token_ids` are accepted too. Unknown fields are a 400 (a typo must
not silently fall back to a default).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from moeray.generation.sampling import MAX_LOGPROBS, SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


class OpenAIError(Exception):
    """An error answered as OpenAI does: HTTP `status` and {"error": {...}} naming the bad field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- the body ------------------------------------------------------------------------------------

def parse_json_body(raw: bytes) -> dict:
    """The body as a JSON object. NaN and Infinity parse to floats here so that the request model
    rejects them by field name (a finite number, an integer, a string was expected there)."""
    if not raw.strip():
        raise OpenAIError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        kind = "array" if isinstance(body, list) else type(body).__name__
        raise OpenAIError(400, f"the request body must be a JSON object, got a JSON {kind}", code="invalid_json")
    return body


def param_name(loc: Sequence[Any]) -> str | None:
    """pydantic's error location as OpenAI names a parameter: ("messages", 0, "content") ->
    "messages[0].content"."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validation_error(exc: ValidationError | list[dict]) -> OpenAIError:
    """A pydantic error (or its list of errors) as a 400 naming every bad field (param: the first)."""
    errors = exc.errors(include_url=False) if isinstance(exc, ValidationError) else exc
    parts = []
    for err in errors:
        where = param_name(err["loc"]) or "body"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown field")
        elif err["type"] == "missing":
            parts.append(f"{where}: field required")
        elif err["type"] == "value_error":  # our own validators name the field and the value
            parts.append(msg if msg.startswith(str(err["loc"][0]) if err["loc"] else "") else f"{where}: {msg}")
        else:
            parts.append(f"{where}: {msg} (got {_shown(err['input'])})")
    return OpenAIError(400, "; ".join(parts), param=param_name(errors[0]["loc"]) if errors else None)


def parse_request(model: type[BaseModel], body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


# ---- requests ------------------------------------------------------------------------------------

class _Strict(BaseModel):
    # strict: a user could send "5" or true where a number is meant; allow_inf_nan: NaN is no number
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _is_token_id(value: Any) -> bool:
    return type(value) is int  # not bool (true), not float (2.0), not str ("7")


def _token_ids(value: list, where: str) -> list[int]:
    if not value:
        raise ValueError(f"{where} is empty: a prompt needs at least one token")
    for i, token in enumerate(value):
        if not _is_token_id(token):
            raise ValueError(f"{where}[{i}] = {_shown(token)} is not a token id (token ids are integers)")
    return value


def _prompts(value: Any) -> list[str | list[int]]:
    """OpenAI's four prompt forms (text, token ids, a list of texts, a list of token-id lists) as
    a list of prompts, each text or token ids. Wrong types raise ValueError, not TypeError:
    pydantic turns only ValueError into a validation error naming the field."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise ValueError("prompt must be a string, a list of token ids, or a non-empty list of strings or of "
                         f"token-id lists, got {_shown(value)}")
    first = value[0]
    if isinstance(first, str):
        for i, prompt in enumerate(value):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt[{i}] = {_shown(prompt)}: a list of prompts holds strings only")  # noqa: TRY004
        return list(value)
    if isinstance(first, list):
        for i, prompt in enumerate(value):
            if not isinstance(prompt, list):
                raise ValueError(  # noqa: TRY004
                    f"prompt[{i}] = {_shown(prompt)}: a list of token-id prompts holds lists only")
            _token_ids(prompt, f"prompt[{i}]")
        return [list(p) for p in value]
    return [_token_ids(value, "prompt")]


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """What completions and chat share."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 or 0: off (vLLM's extra)")
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stop_token_ids: list[int] = Field(default_factory=list, description="vLLM's extra")
    ignore_eos: bool = Field(False, description="vLLM's extra")
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop_strings(cls, value: Any) -> list[str]:
        stops = [value] if isinstance(value, str) else [] if value is None else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {_shown(value)}")
        return stops

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got n={n}: send the request {n} times instead")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError(f"penalties are not supported: only 0 is accepted, got {value}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo):
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is allowed only with stream=true")
        return options

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. After validation `prompt` is a list of prompts (text or token ids)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(COMPLETION_DEFAULT_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt_forms(cls, value: Any) -> list[str | list[int]]:
        return _prompts(value)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo=true is not supported")
        return echo

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix is not supported")
        return suffix


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None

    @field_validator("content", mode="plain")
    @classmethod
    def _text_content(cls, value: Any) -> str | None:
        """A string, or OpenAI's list of {"type": "text", "text": ...} parts (joined)."""
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                           and isinstance(p.get("text"), str) and set(p) == {"type", "text"}
                                           for p in value):
            return "".join(p["text"] for p in value)
        raise ValueError(f"content must be a string or a list of text parts {{'type': 'text', 'text': ...}}, "
                         f"got {_shown(value)}")


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return top

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class RebalanceRequest(_Strict):
    """POST /v1/rebalance (ours); an empty body means {}."""

    force: bool = True


class ScaleRequest(_Strict):
    """POST /v1/scale (ours): the worker count to serve with from now on."""

    num_workers: int = Field(ge=1)


def sampling_params(request: _SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                              top_k=request.top_k, seed=request.seed, stop=request.stop,
                              stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos, logprobs=logprobs)
    except ValidationError as exc:  # the fields share names, so the error names the request's field
        raise validation_error(exc) from None


def check_context(num_prompt_tokens: int, max_tokens: int, max_model_len: int, max_tokens_per_request: int) -> None:
    """400 when prompt + max_tokens does not fit the context or the service's per-request limit."""
    total = num_prompt_tokens + max_tokens
    if total > max_model_len:
        raise OpenAIError(400, f"this model's context holds {max_model_len} tokens, but the request needs {total} "
                               f"({num_prompt_tokens} in the prompt + max_tokens={max_tokens}): lower max_tokens",
                          param="max_tokens", code="context_length_exceeded")
    if total > max_tokens_per_request:
        raise OpenAIError(400, f"the request needs {total} tokens ({num_prompt_tokens} in the prompt + max_tokens="
                               f"{max_tokens}) > this service's max_tokens_per_request={max_tokens_per_request}",
                          param="max_tokens", code="context_length_exceeded")

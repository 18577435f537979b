"""The OpenAI request bodies the server accepts, checked at the edge: every bad request becomes an
ApiError (an HTTP status and OpenAI's JSON error, naming the field) before anything is queued.

Fields OpenAI defines but this server cannot honour (n > 1, penalties, logit_bias, tools...) are
accepted at their neutral value only; any other value is refused, never silently ignored. A field
OpenAI does not define is refused too, as OpenAI refuses it.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

MAX_STOPS = 4  # stop strings per request, OpenAI's own bound (each builds a matcher on two ranks)
MAX_TOP_LOGPROBS = 20  # OpenAI's own bound for chat's top_logprobs (and vLLM's for completions' logprobs)


class ApiError(Exception):
    """A request the server refuses: HTTP status, one-line message, the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Common(_Strict):
    model: StrictStr
    temperature: StrictFloat | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | None = Field(None, gt=0, le=1)
    seed: StrictInt | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOPS)] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # metadata only
    # defined by OpenAI, honoured at their neutral value only (see _neutral)
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict | None = None


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = None
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict | None = None
    tools: list | None = None


_NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "best_of": 1, "suffix": None,
            "tools": [], "response_format": {"type": "text"}}


def parse(body: bytes, kind: type[_Common]) -> _Common:
    """The raw body as a request of `kind`: ApiError 400 for bytes that are not UTF-8 JSON, or a
    field that is missing, unknown, of the wrong type or out of range."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}): send UTF-8 JSON") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}): send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body is a JSON {type(data).__name__}, not an object")
    try:
        req = kind.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("list[", "str", "int")))
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unrecognized request argument supplied: {param}", param) from None
        raise ApiError(400, f"{param or 'body'}: {err['msg']} (got {_short(err.get('input'))})", param or None) from None
    _neutral(req)
    _unicode(data, "")
    return req


def _neutral(req: _Common) -> None:
    for name, neutral in _NEUTRAL.items():
        value = getattr(req, name, None)
        if value is not None and value != neutral and not (isinstance(neutral, (int, float)) and value == neutral):
            raise ApiError(400, f"{name}={_short(value)} is not supported by this server: leave it out "
                                f"(or send {json.dumps(neutral)})", name)


def _unicode(value, where: str) -> None:
    """JSON admits lone surrogates ("\\ud800"); no tokenizer does."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"{where or 'body'} is not valid Unicode (a lone surrogate at character {e.start}): "
                                f"send valid UTF-16 escapes", where or None) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _unicode(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _unicode(v, f"{where}.{i}")


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def message_text(m: Message) -> str:
    return m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)


Request = Union[CompletionRequest, ChatRequest]

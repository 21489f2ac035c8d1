"""The OpenAI chat-completions API as ``stream-rt worker`` speaks it: the request schema
(:class:`ChatRequest`, every field OpenAI defines honoured or refused with the field
named), its validation into the model's terms (images, Hugging Face chat messages,
:class:`~stream_rt.mllm.backends.decoding.Sampling`), and the pieces of a response (usage,
finish reason, log-probabilities) in OpenAI's format.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream_rt.media.images import decode_image
from stream_rt.mllm.backends.decoding import Generation, Sampling, TokenLogprob

Strict = ConfigDict(extra="forbid")


class _ImageURL(BaseModel):
    model_config = Strict
    url: str
    detail: Literal["auto", "low", "high", "original"] | None = None  # no effect: the model's processor sizes images


class _CacheBreakpoint(BaseModel):
    model_config = Strict
    mode: Literal["explicit"]
    ttl: str | None = None


class _Part(BaseModel):
    model_config = Strict
    type: str
    text: str | None = None
    image_url: _ImageURL | None = None
    prompt_cache_breakpoint: _CacheBreakpoint | None = None  # a caching hint: no effect
    uuid: str | None = None  # vLLM's id of an image's content, a caching hint: no effect
    input_audio: Any = None  # refused
    file: Any = None  # refused
    refusal: str | None = None  # refused


class _Message(BaseModel):
    model_config = Strict
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[_Part] | None = None
    name: str | None = None  # refused: chat templates have no place for it
    refusal: str | None = None  # refused
    tool_calls: list[Any] | None = None  # refused
    tool_call_id: str | None = None  # refused (tool messages)
    function_call: Any = None  # refused
    audio: Any = None  # refused


class StreamOptions(BaseModel):
    model_config = Strict
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's: usage on every chunk
    include_obfuscation: bool | None = None  # only false: the worker pads nothing


class ChatRequest(BaseModel):
    """A chat-completions request: every field OpenAI's API (and the official client)
    defines, honoured or refused by :meth:`refused`. Unknown fields are refused."""

    model_config = Strict
    model: str = ""
    messages: list[_Message] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # honoured
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator takes
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    n: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    service_tier: str | None = None
    store: bool | None = None
    # accepted, with no effect on the answer (identifiers, hints, tags of stored completions)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    # refused when given
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: Any = None
    moderation: Any = None

    def refused(self) -> tuple[str, str] | None:
        """(the field, why) for the first thing this request asks that the worker does
        not do, if any."""
        for name in ("tools", "functions", "function_call", "audio", "prediction", "reasoning_effort", "verbosity",
                     "web_search_options", "moderation"):  # fmt: skip
            if getattr(self, name):
                return name, f"'{name}' is not supported by this worker"
        if self.n is not None and self.n > 1:
            return "n", "n > 1 is not supported: one choice per request"
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            return "response_format", (f"response_format '{kind}' is not supported (the answer contract asks for "
                                       "JSON in the prompt)")  # fmt: skip
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "tool_choice needs tools, which are not supported"
        if self.modalities not in (None, ["text"]):
            return "modalities", "only the text modality is supported"
        if self.service_tier not in (None, "auto", "default"):
            return "service_tier", f"service_tier '{self.service_tier}' is not supported (only 'auto', 'default')"
        if self.store:
            return "store", "store is not supported: the worker keeps no completions"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        stops = self.stop_strings
        if len(stops) > 4 or not all(stops):
            return "stop", "stop takes up to 4 non-empty strings"
        if self.stream_options is not None:
            if not self.stream:
                return "stream_options", "stream_options is only allowed with stream: true"
            if self.stream_options.include_obfuscation:
                return "stream_options.include_obfuscation", "the worker does not obfuscate streams"
        for i, message in enumerate(self.messages):
            if (refused := _refused_in(message, f"messages[{i}]")) is not None:
                return refused
        return None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self, vocabulary: int) -> Sampling:
        """How the tokens of the answer are chosen. Raises :class:`RequestError` for a
        ``logit_bias`` naming no token of the model."""
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocabulary or not -100 <= value <= 100:
                raise RequestError(f"logit_bias: {key!r}: {value} is not a token id below {vocabulary} with a bias "
                                   "from -100 to 100", "logit_bias")  # fmt: skip
            bias[int(key)] = value
        return Sampling(
            temperature=self.temperature or 0.0, top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed,
            stop=self.stop_strings, logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=bias,
        )  # fmt: skip


def _refused_in(message: _Message, where: str) -> tuple[str, str] | None:
    for name in ("name", "refusal", "tool_calls", "tool_call_id", "function_call", "audio"):
        if getattr(message, name) is not None:
            return f"{where}.{name}", f"'{name}' in a message is not supported by this worker"
    if message.role in ("tool", "function"):
        return f"{where}.role", f"{message.role} messages are not supported (tools are not)"
    if message.content is None:
        return f"{where}.content", "a message needs content"
    for j, part in enumerate(message.content if isinstance(message.content, list) else []):
        allowed = ("text", "image_url") if message.role == "user" else ("text",)
        if part.type not in allowed:
            return f"{where}.content[{j}].type", f"'{part.type}' content is not supported in {message.role} messages"
        if (part.text if part.type == "text" else part.image_url) is None:
            return f"{where}.content[{j}]", f"a '{part.type}' part needs '{part.type}'"
    return None


class RequestError(ValueError):
    """The request cannot be served; ``str()`` is what the client is told, ``param`` the
    field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def image_from_url(url: str, param: str | None = None) -> npt.NDArray[np.uint8]:
    """An RGB array from a ``data:image/...;base64,`` URL."""
    if not url.startswith("data:"):
        raise RequestError("only data: image URLs are accepted (the worker fetches nothing)", param)
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise RequestError("image data URLs must be base64", param)
    try:
        return np.asarray(decode_image(base64.b64decode(payload, validate=True)).to_ndarray(format="rgb24"), np.uint8)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"an image could not be decoded: {exc}", param) from None


def conversation(request: ChatRequest) -> tuple[list[npt.NDArray[np.uint8]], list[dict[str, Any]]]:
    """The request's images and its messages as Hugging Face chat messages (each image
    where it was given; a developer message is a system message)."""
    if not any(m.role == "user" for m in request.messages):
        raise RequestError("no user message", "messages")
    images: list[npt.NDArray[np.uint8]] = []
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        parts = message.content if isinstance(message.content, list) else [_Part(type="text", text=message.content)]
        content: list[dict[str, Any]] = []
        for j, part in enumerate(parts):
            if part.type == "image_url":
                assert part.image_url is not None
                images.append(image_from_url(part.image_url.url, f"messages[{i}].content[{j}].image_url.url"))
                content.append({"type": "image"})
            else:
                content.append({"type": "text", "text": part.text or ""})
        messages.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    return images, messages


def validation_error(exc: ValidationError) -> tuple[str, str]:
    """(the field at fault, what is wrong) from pydantic's first error, in OpenAI's words."""
    error = exc.errors()[0]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
    if error["type"] == "extra_forbidden":
        return param, f"Unrecognized request argument supplied: {param}"
    return param, f"{param}: {error['msg']}"


def logprobs_of(entries: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict[str, Any]:
    """Log-probabilities in OpenAI's format (``bytes``: the bytes the token stands for)."""

    def token(text: str, logprob: float, raw: bytes) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    content = [{**token(e.token, e.logprob, e.raw), "top_logprobs": [token(*t) for t in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def finish_reason(gen: Generation) -> str:
    return "length" if gen.stop == "max_tokens" else "stop"


def usage(gen: Generation) -> dict[str, int]:
    n = len(gen.token_ids)
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": n, "total_tokens": gen.prompt_tokens + n}

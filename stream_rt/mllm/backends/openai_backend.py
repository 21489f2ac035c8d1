"""Any OpenAI-compatible chat-completions server (vLLM, llama.cpp server, Ollama,
``stream-rt worker``) as a backend, for models that do not fit on the device.

Requests go out as one user message with the images as JPEG data URLs, streamed
(server-sent events) at temperature 0. The contract stop works here too: once the answer's
JSON object closes the stream is closed, which makes vLLM and llama.cpp abort the
generation. Timings: ``first_token`` (upload, vision encoding and prefill on the server)
and ``decode``. An answer of a model with random weights served by ``stream-rt worker``
(the smoke model) is labelled so: the worker says it in the :data:`SMOKE_HEADER` response
header and the ``system_fingerprint`` :data:`SMOKE_FINGERPRINT`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

import aiohttp

from stream_rt.graph.packets import MllmAnswer, MllmRequest
from stream_rt.media.images import rgb_to_jpeg
from stream_rt.mllm.backend import Backend, BackendError, OnText, answer_from_text
from stream_rt.mllm.contract import JsonObjectEnd
from stream_rt.mllm.prompt import request_text

log = logging.getLogger("stream_rt.mllm")

SMOKE_HEADER = "X-Stream-RT-Smoke"
"""The response header ``stream-rt worker`` adds when its model has random weights."""

SMOKE_FINGERPRINT = "stream_rt-smoke"
"""The ``system_fingerprint`` of ``stream-rt worker``'s answers when its model has random weights."""


def openai_messages(request: MllmRequest) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()}}
        for jpeg in (rgb_to_jpeg(image) for image in request.images)
    ]
    content.append({"type": "text", "text": request_text(request)})
    return [{"role": "user", "content": content}]


class OpenAIBackend(Backend):
    """A :class:`Backend` calling an OpenAI-compatible chat-completions server at ``url``
    (vLLM, llama.cpp server, Ollama, ``stream-rt worker``) for ``model``: images sent as JPEG
    data URLs, answers streamed and stopped as soon as the answer contract is satisfied."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        max_new_tokens: int = 128,
        contract_stop: bool = True,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = model
        self.api_key = api_key
        self.max_new_tokens = max_new_tokens
        self.contract_stop = contract_stop
        self.connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._usage_on_every_chunk = True  # until a server refuses continuous_usage_stats

    async def start(self) -> None:
        if self._session is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            timeout = aiohttp.ClientTimeout(sock_connect=self.connect_timeout_s)
            self._session = aiohttp.ClientSession(headers=headers, timeout=timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await super().close()

    async def answer(self, request: MllmRequest, on_text: OnText | None = None) -> MllmAnswer:
        await self.start()
        assert self._session is not None
        messages = await asyncio.to_thread(openai_messages, request)
        body = {
            "model": self.name,
            "messages": messages,
            "max_tokens": self.max_new_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self._usage_on_every_chunk:
            # vLLM's (and stream-rt worker's) continuous_usage_stats: the prompt's length
            # arrives with the first tokens, though the contract stop closes the stream early.
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        started = time.perf_counter()
        first_token: float | None = None
        text, stop, chunks = "", "max_tokens", 0
        usage: dict[str, int] = {}
        smoke = False
        contract = JsonObjectEnd()
        try:
            async with self._session.post(f"{self.url}/chat/completions", json=body) as response:
                if response.status != 200:
                    detail = (await response.text())[:200].replace("\n", " ")
                    if response.status == 400 and self._usage_on_every_chunk and "continuous_usage_stats" in detail:
                        raise _RefusedUsageOption
                    raise BackendError(f"{self.url} answered HTTP {response.status}: {detail}")
                smoke = SMOKE_HEADER in response.headers
                async for data in _events(response):
                    if isinstance(data.get("error"), dict):  # the server failed mid-stream
                        raise BackendError(f"{self.url}: {str(data['error'].get('message', ''))[:200]}")
                    if data.get("usage"):
                        usage = data["usage"]
                    smoke = smoke or data.get("system_fingerprint") == SMOKE_FINGERPRINT
                    for choice in data.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            first_token = first_token or time.perf_counter()
                            chunks += 1
                            text += piece
                            if on_text is not None:
                                on_text(piece)
                            if self.contract_stop and contract.feed(piece):
                                stop = "contract"
                        reason = choice.get("finish_reason")
                        if reason and stop != "contract":
                            stop = "eos" if reason == "stop" else "max_tokens"
                    if stop == "contract":
                        break  # closing the stream makes the server stop generating
        except aiohttp.ClientError as exc:
            raise BackendError(f"cannot reach {self.url}: {exc}") from None
        except _RefusedUsageOption:  # asked again without it, the refused response released
            log.info("%s does not take continuous_usage_stats: prompt token counts may read 0", self.url)
            self._usage_on_every_chunk = False
            return await self.answer(request, on_text)
        ended = time.perf_counter()
        first = (first_token or ended) - started
        return answer_from_text(
            request, text, self, stop=stop, smoke=smoke,
            timings={"first_token": first, "decode": ended - started - first, "total": ended - started},
            tokens={"prompt": int(usage.get("prompt_tokens", 0)),
                    "generated": int(usage.get("completion_tokens", chunks))},
        )  # fmt: skip


class _RefusedUsageOption(Exception):
    """The server answered 400 to ``stream_options.continuous_usage_stats``."""


async def _events(response: aiohttp.ClientResponse) -> Any:
    """The JSON payloads of a server-sent event stream, until ``[DONE]``."""
    async for raw in response.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except json.JSONDecodeError:
            raise BackendError(f"the server sent a stream event that is not JSON: {data[:80]!r}") from None

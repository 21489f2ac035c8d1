"""``stream-rt worker``: a local model served over the OpenAI-compatible chat-completions
API, so daemons on small devices can use a GPU host with ``[mllm] backend = "openai"``
(and so can any OpenAI client).

Endpoints: ``POST /v1/chat/completions`` (streamed as server-sent events or not; images
as ``data:`` URLs, JPEG or PNG; remote image URLs are refused, the worker fetches
nothing), ``GET /v1/models``, ``GET /healthz``. One generation runs at a time; a client
that disconnects cancels its generation at the next token. Answers of the smoke model
carry ``"smoke": true``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import threading
import time
import uuid
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream_rt.mllm.transformers_backend import Generation, TransformersBackend
from stream_rt.sources.av_decode import decode_image

log = logging.getLogger("stream_rt.worker")

MAX_BODY = 32 * 1024 * 1024


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: dict[str, Any] | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[_Part]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = ""
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class RequestError(ValueError):
    """The request cannot be served; ``str()`` is what the client is told."""


def image_from_url(url: str) -> npt.NDArray[np.uint8]:
    """An RGB array from a ``data:image/...;base64,`` URL."""
    if not url.startswith("data:"):
        raise RequestError("only data: image URLs are accepted (the worker fetches nothing)")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise RequestError("image data URLs must be base64")
    try:
        return np.asarray(decode_image(base64.b64decode(payload, validate=True)).to_ndarray(format="rgb24"), np.uint8)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"an image could not be decoded: {exc}") from None


def images_and_text(request: ChatRequest) -> tuple[list[npt.NDArray[np.uint8]], str]:
    """The images and the text of the last user message."""
    user = [m for m in request.messages if m.role == "user"]
    if not user:
        raise RequestError("no user message")
    content = user[-1].content
    if isinstance(content, str):
        return [], content
    images = [image_from_url(str((p.image_url or {}).get("url", ""))) for p in content if p.type == "image_url"]
    text = "\n".join(p.text or "" for p in content if p.type == "text")
    return images, text


class Worker:
    def __init__(self, backend: TransformersBackend, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.backend = backend
        self.host, self.port = host, port
        self.served = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        await self.backend.start()
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/healthz", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("worker: %s on http://%s:%d/v1/chat/completions", self.backend.name, self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.backend.name, "object": "model"}]})

    async def _chat(self, http: web.Request) -> web.StreamResponse:
        try:
            body = ChatRequest.model_validate(await http.json())
            images, text = await asyncio.to_thread(images_and_text, body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the body is not JSON")
        except ValidationError as exc:
            error = exc.errors()[0]
            return _error(400, f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}")
        except RequestError as exc:
            return _error(400, str(exc))
        limit = body.max_completion_tokens or body.max_tokens
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        async def generate() -> Generation:
            try:
                return await self.backend.in_model_thread(self.backend.generate, images, text, cancel, on_text, limit)
            finally:
                loop.call_soon_threadsafe(pieces.put_nowait, None)

        task = asyncio.ensure_future(generate())
        ident = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        try:
            if not body.stream:
                gen = await task
                self.served += 1
                return web.json_response(self._completion(ident, gen))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(http)
            while (piece := await pieces.get()) is not None:
                await response.write(self._chunk(ident, {"content": piece}, None))
            gen = await task
            await response.write(self._chunk(ident, {}, _finish_reason(gen)))
            if (body.stream_options or {}).get("include_usage"):
                usage = {**self._base(ident, "chat.completion.chunk"), "choices": [], "usage": _usage(gen)}
                await response.write(_sse(usage))
            await response.write(b"data: [DONE]\n\n")
            self.served += 1
            return response
        except (ConnectionResetError, asyncio.CancelledError):
            cancel.set()  # the client went away: stop at the next token
            raise
        except Exception as exc:
            cancel.set()
            log.warning("worker: generation failed: %s", exc)
            return _error(500, f"generation failed: {exc}")

    def _base(self, ident: str, kind: str) -> dict[str, Any]:
        base: dict[str, Any] = {"id": ident, "object": kind, "created": int(time.time()), "model": self.backend.name}
        if self.backend.smoke:
            base["smoke"] = True
        return base

    def _chunk(self, ident: str, delta: dict[str, str], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return _sse({**self._base(ident, "chat.completion.chunk"), "choices": [choice]})

    def _completion(self, ident: str, gen: Generation) -> dict[str, Any]:
        message = {"role": "assistant", "content": gen.text}
        return {
            **self._base(ident, "chat.completion"),
            "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(gen)}],
            "usage": _usage(gen),
        }


def _finish_reason(gen: Generation) -> str:
    return "length" if gen.stop == "max_tokens" else "stop"


def _usage(gen: Generation) -> dict[str, int]:
    n = len(gen.token_ids)
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": n, "total_tokens": gen.prompt_tokens + n}


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)

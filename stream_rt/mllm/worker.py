"""``stream-rt worker``: a local model served over the OpenAI-compatible chat-completions
API, so daemons on small devices can use a GPU host with ``[mllm] backend = "openai"``
(and so can any OpenAI client).

Endpoints: ``POST /v1/chat/completions`` (streamed as server-sent events or not; images
as ``data:`` URLs, JPEG or PNG; remote image URLs are refused, the worker fetches
nothing), ``GET /v1/models``, ``GET /healthz``. Errors are OpenAI's JSON error objects,
404 and 405 included: an unknown ``model`` is 404 ``model_not_found``; what the worker
cannot do is refused with 400 rather than ignored (``n`` > 1, ``tools``, a
``response_format`` other than text). With an API key (``--api-key`` or
``$STREAM_RT_WORKER_API_KEY``; required to listen beyond loopback) every ``/v1`` request
must carry it as a bearer token. Requests are served concurrently and decoded together
(:mod:`stream_rt.mllm.batching`: up to ``max_batch`` in one forward pass per token, a new
request joining at the next step); at most ``max_waiting`` more wait for a place (more
are answered 429), and a client that disconnects ends its generation at the next token
(one log line). Answers
of the smoke model carry ``"smoke": true``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream_rt.mllm.batching import MAX_BATCH, ContinuousBatch
from stream_rt.mllm.decoding import Generation
from stream_rt.mllm.transformers_backend import TransformersBackend
from stream_rt.sources.av_decode import decode_image

log = logging.getLogger("stream_rt.worker")

MAX_BODY = 32 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
    n: int = Field(1, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        """What this request asks that the worker does not do, if anything."""
        if self.n > 1:
            return "n > 1 is not supported: one choice per request"
        if self.tools:
            return "tools are not supported"
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            return f"response_format '{kind}' is not supported (the answer contract asks for JSON in the prompt)"
        return None


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


LOOPBACK = {"127.0.0.1", "::1", "localhost"}

STOP_GRACE_S = 5.0
"""How long a stopping worker gives its connections to finish."""

MAX_WAITING = 16
"""Generations that may wait for a place in the batch; more are answered 429."""


class Worker:
    def __init__(self, backend: TransformersBackend, host: str = "127.0.0.1", port: int = 8000, *,
                 api_key: str | None = None, max_waiting: int = MAX_WAITING, max_batch: int | None = None,
                 served_name: str | None = None) -> None:  # fmt: skip
        if host not in LOOPBACK and not api_key:
            raise RequestError(f"listening on {host} needs an API key (--api-key or $STREAM_RT_WORKER_API_KEY)")
        self.backend = backend
        self.batch = ContinuousBatch(backend, max_batch or MAX_BATCH)
        self.host, self.port = host, port
        self.api_key = api_key
        self.max_waiting = max_waiting
        self._served_name = served_name
        self.served = 0
        self.created = int(time.time())
        self._generations = 0  # decoding or waiting for a place in the batch
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        await self.backend.start()
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors_as_json, self._authorised])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/healthz", self._health)
        # A client that hangs up cancels its handler, so an unstreamed generation stops too.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=STOP_GRACE_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("worker: %s on http://%s:%d/v1/chat/completions", self.backend.name, self.host, self.port)

    @property
    def model_id(self) -> str:
        """The model id clients ask for: the served name, else 'smoke' for the smoke model
        (a directory of it too), else the model as given."""
        return self._served_name or ("smoke" if self.backend.smoke else self.backend.name)

    async def stop(self) -> None:
        """Stop serving: generations under way end at their next token (their clients get
        what was generated so far) and connections get ``STOP_GRACE_S`` to finish."""
        self.batch.cancel_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _errors_as_json(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp's own 404 and 405 in OpenAI's error format."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = "not_found" if exc.status == 404 else "invalid_request_error"
            return _error(exc.status, f"{request.method} {request.path}: {exc.reason}", kind)

    @web.middleware
    async def _authorised(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.api_key and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return _error(401, "a valid API key is needed (Authorization: Bearer ...)", "invalid_api_key",
                              code="invalid_api_key")  # fmt: skip
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _models(self, request: web.Request) -> web.Response:
        entry = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "stream_rt"}
        return web.json_response({"object": "list", "data": [entry]})

    async def _chat(self, http: web.Request) -> web.StreamResponse:
        try:
            body = ChatRequest.model_validate(await http.json())
            if body.model != self.model_id:
                return _error(404, f"The model '{body.model}' does not exist (this worker serves "
                                   f"'{self.model_id}')", param="model", code="model_not_found")  # fmt: skip
            if (unsupported := body.unsupported()) is not None:
                return _error(400, unsupported)
            images, text = await asyncio.to_thread(images_and_text, body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the body is not JSON")
        except ValidationError as exc:
            error = exc.errors()[0]
            return _error(400, f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}")
        except RequestError as exc:
            return _error(400, str(exc))
        if self._generations >= self.max_waiting + self.batch.max_batch:
            return _error(429, f"{self._generations} generations are running or waiting; try again later",
                          "rate_limit_error")  # fmt: skip
        self._generations += 1
        try:
            return await self._generate(http, body, images, text)
        finally:
            self._generations -= 1

    async def _generate(
        self, http: web.Request, body: ChatRequest, images: list[npt.NDArray[np.uint8]], text: str
    ) -> web.StreamResponse:
        limit = body.max_completion_tokens or body.max_tokens
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        prompt = [0]  # its length in tokens, once the model knows it

        def on_prompt(tokens: int) -> None:
            prompt[0] = tokens

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        async def generate() -> Generation:
            try:
                return await self.batch.generate(images, text, cancel, on_text, limit, on_prompt)
            finally:
                loop.call_soon_threadsafe(pieces.put_nowait, None)

        task = asyncio.ensure_future(generate())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a client that left never reads it
        ident = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        response: web.StreamResponse | None = None
        try:
            if not body.stream:
                gen = await task
                self.served += 1
                return web.json_response(self._completion(ident, gen))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(http)
            await response.write(self._chunk(ident, {"role": "assistant", "content": ""}, None))
            # vLLM's continuous_usage_stats: usage on every chunk, so a client that stops
            # reading early (the answer contract closed) still has the prompt's length.
            running = bool((body.stream_options or {}).get("continuous_usage_stats"))
            sent = 0
            while (piece := await pieces.get()) is not None:
                sent += 1
                so_far = {"prompt_tokens": prompt[0], "completion_tokens": sent, "total_tokens": prompt[0] + sent}
                await response.write(self._chunk(ident, {"content": piece}, None, so_far if running else None))
            gen = await task
            await response.write(self._chunk(ident, {}, _finish_reason(gen)))
            if (body.stream_options or {}).get("include_usage"):
                last = {**self._base(ident, "chat.completion.chunk"), "choices": [], "usage": _usage(gen)}
                await response.write(_sse(last))
            await response.write(b"data: [DONE]\n\n")
            self.served += 1
            return response
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            cancel.set()  # the client went away: stop at the next token
            log.info("worker: the client of %s went away; its generation stops", ident)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return web.Response(status=499)
        except Exception as exc:
            cancel.set()
            log.warning("worker: generation failed: %s", exc)
            if response is None or not response.prepared:
                return _error(500, f"generation failed: {exc}")
            # Mid-stream: say so in the stream and end it, or the client waits for its timeout.
            failed = {"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None,
                                "code": None}}  # fmt: skip
            await response.write(_sse(failed))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response

    def _base(self, ident: str, kind: str) -> dict[str, Any]:
        base: dict[str, Any] = {"id": ident, "object": kind, "created": int(time.time()), "model": self.model_id}
        if self.backend.smoke:
            base["smoke"] = True
        return base

    def _chunk(
        self, ident: str, delta: dict[str, str], finish: str | None, usage: dict[str, int] | None = None
    ) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        chunk = {**self._base(ident, "chat.completion.chunk"), "choices": [choice]}
        return _sse({**chunk, "usage": usage} if usage else chunk)

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


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> web.Response:  # fmt: skip
    """An error as OpenAI's API gives it."""
    error = {"message": message, "type": kind, "param": param, "code": code}
    return web.json_response({"error": error}, status=status)

"""``stream-rt worker``: a local model served over the OpenAI-compatible chat-completions
API, so daemons on small devices can use a GPU host with ``[mllm] backend = "openai"``
(and so can any OpenAI client).

Endpoints: ``POST /v1/chat/completions`` (streamed as server-sent events or not; images
as ``data:`` URLs, JPEG or PNG; remote image URLs are refused, the worker fetches
nothing), ``GET /v1/models``, and ``GET /health`` (vLLM's; ``/healthz`` too): 200 while
the model is loaded and getting on, 503 with the reason otherwise. Errors are OpenAI's
JSON error objects, 404 and 405 included: an unknown ``model`` is 404
``model_not_found``. Every request field OpenAI's API defines is either honoured or
refused with 400 ``invalid_request_error`` naming it in ``param`` (:class:`ChatRequest`
says which is which); a field OpenAI does not define is refused too, as OpenAI does. With
an API key (``--api-key`` or ``$STREAM_RT_WORKER_API_KEY``; required to listen beyond
loopback) every ``/v1`` request must carry it as a bearer token.

Requests are served concurrently by a :class:`~stream_rt.mllm.worker.scheduling.Scheduler`:
decoded together where the model's family has an adapter (continuous batching, up to
``max_batch`` in one forward pass per token), one at a time otherwise; at most
``max_waiting`` more wait for a place (more are answered 429), and a client that
disconnects ends its generation at the next token (one log line). Answers of a model with
random weights (the smoke model, a tiny test model) say so in standard places: the model
id ``smoke`` (by default), ``system_fingerprint`` :data:`SMOKE_FINGERPRINT` and the
response header :data:`SMOKE_HEADER`.

This module is the HTTP side (the aiohttp app, its routes, authorisation, streaming);
:mod:`stream_rt.mllm.worker.chat_api` holds the request schema, its validation and the pieces of
an answer in OpenAI's format.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from aiohttp import web
from pydantic import ValidationError

from stream_rt.mllm.backend import first_line
from stream_rt.mllm.backends.decoding import Generation, Piece, Sampling
from stream_rt.mllm.backends.openai_backend import SMOKE_FINGERPRINT, SMOKE_HEADER
from stream_rt.mllm.backends.transformers_backend import TransformersBackend
from stream_rt.mllm.worker.chat_api import (
    ChatRequest,
    RequestError,
    StreamOptions,
    conversation,
    finish_reason,
    logprobs_of,
    usage,
    validation_error,
)
from stream_rt.mllm.worker.scheduling import Scheduler, scheduler_for
from stream_rt.version import __version__

__all__ = ["Worker"]

log = logging.getLogger("stream_rt.worker")

MAX_BODY = 32 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOOPBACK = {"127.0.0.1", "::1", "localhost"}

STOP_GRACE_S = 5.0
"""How long a stopping worker gives its connections to finish."""

MAX_WAITING = 16
"""Generations that may wait for a place; more are answered 429."""

STUCK_S = 120.0
"""How long the model may go without getting on (a prefill, a token) while it has work
before the health route says it is stuck."""


class Worker:
    def __init__(self, backend: TransformersBackend, host: str = "127.0.0.1", port: int = 8000, *,
                 api_key: str | None = None, max_waiting: int = MAX_WAITING, max_batch: int | None = None,
                 served_name: str | None = None, stuck_s: float = STUCK_S) -> None:  # fmt: skip
        if host not in LOOPBACK and not api_key:
            raise RequestError(f"listening on {host} needs an API key (--api-key or $STREAM_RT_WORKER_API_KEY)")
        self.backend = backend
        self.scheduler: Scheduler | None = None  # once the model is loaded
        self.host, self.port = host, port
        self.api_key = api_key
        self.max_waiting = max_waiting
        self.max_batch = max_batch
        self.stuck_s = stuck_s
        self._served_name = served_name
        self.served = 0
        self.created = int(time.time())
        self._generations = 0  # decoding or waiting for a place
        self._stopping = False
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        await self.backend.start()
        self.scheduler = scheduler_for(self.backend, self.max_batch)
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors_as_json, self._authorised])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/healthz", self._healthz)
        # A client that hangs up cancels its handler, so an unstreamed generation stops too.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=STOP_GRACE_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("worker: %s on http://%s:%d/v1/chat/completions (%s)", self.backend.name, self.host, self.port,
                 self.scheduler.kind)  # fmt: skip

    @property
    def model_id(self) -> str:
        """The model id clients ask for: the served name, else 'smoke' for a model with
        random weights (the smoke model, a tiny test model), else the model as given."""
        return self._served_name or ("smoke" if self.backend.smoke else self.backend.name)

    @property
    def fingerprint(self) -> str:
        """The ``system_fingerprint`` of every answer: what serves it."""
        return SMOKE_FINGERPRINT if self.backend.smoke else f"stream_rt-{__version__}"

    async def stop(self) -> None:
        """Stop serving: generations under way end at their next token (their clients get
        what was generated so far) and connections get ``STOP_GRACE_S`` to finish."""
        self._stopping = True
        if self.scheduler is not None:
            self.scheduler.cancel_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def problem(self) -> str | None:
        """Why the worker cannot answer now, if it cannot: stopping, the model not loaded,
        or the model thread busy without getting on for ``stuck_s``."""
        if self._stopping:
            return "the worker is stopping"
        if self.backend.model is None or self.scheduler is None:
            return "the model is not loaded"
        busy = self.backend.busy_since
        if busy is not None:
            quiet = time.monotonic() - max(busy, self.scheduler.progressed)
            if quiet > self.stuck_s:
                return f"the model has not got on for {quiet:.0f} s (stuck in a step?)"
        return None

    @property
    def _headers(self) -> dict[str, str]:
        return {SMOKE_HEADER: "random weights; the answers are not meaningful"} if self.backend.smoke else {}

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
        """vLLM's health route: 200 while the model is loaded and getting on, else 503 saying why."""
        problem = self.problem()
        if problem is not None:
            return web.json_response({"status": "unavailable", "reason": problem}, status=503)
        assert self.scheduler is not None
        return web.json_response({"status": "ok", "model": self.model_id, "scheduler": self.scheduler.kind,
                                  "generations": self._generations}, headers=self._headers)  # fmt: skip

    async def _healthz(self, request: web.Request) -> web.Response:
        problem = self.problem()
        return web.Response(text=f"{problem or 'ok'}\n", status=503 if problem else 200)

    async def _models(self, request: web.Request) -> web.Response:
        entry = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "stream_rt"}
        return web.json_response({"object": "list", "data": [entry]}, headers=self._headers)

    async def _chat(self, http: web.Request) -> web.StreamResponse:
        try:
            body = ChatRequest.model_validate(await http.json())
            if body.model != self.model_id:
                return _error(404, f"The model '{body.model}' does not exist (this worker serves "
                                   f"'{self.model_id}')", param="model", code="model_not_found")  # fmt: skip
            if (refused := body.refused()) is not None:
                return _error(400, refused[1], param=refused[0])
            if (problem := self.problem()) is not None:
                return _error(503, f"the worker cannot answer now: {problem}", "service_unavailable")
            assert self.scheduler is not None
            sampling = body.sampling(self._vocabulary())
            images, messages = await asyncio.to_thread(conversation, body)
            await asyncio.to_thread(self._render, messages)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the body is not JSON")
        except ValidationError as exc:
            param, message = validation_error(exc)
            return _error(400, message, param=param)
        except RequestError as exc:
            return _error(400, str(exc), param=exc.param)
        if self._generations >= self.max_waiting + self.scheduler.max_batch:
            return _error(429, f"{self._generations} generations are running or waiting; try again later",
                          "rate_limit_error")  # fmt: skip
        self._generations += 1
        try:
            return await self._generate(http, body, images, messages, sampling)
        finally:
            self._generations -= 1

    def _vocabulary(self) -> int:
        """How many tokens the model's logits cover."""
        head = self.backend.model.get_output_embeddings()
        if head is not None:
            return int(head.weight.shape[0])
        return int(self.backend.model.config.get_text_config().vocab_size)

    def _render(self, messages: list[dict[str, Any]]) -> None:
        """Check that the model's chat template takes these messages."""
        assert self.backend.family is not None
        try:
            self.backend.family.render(messages)
        except Exception as exc:
            raise RequestError(f"the model's chat template does not take these messages: {first_line(exc)}",
                               "messages") from None  # fmt: skip

    async def _generate(self, http: web.Request, body: ChatRequest, images: list[npt.NDArray[np.uint8]],
                        messages: list[dict[str, Any]], sampling: Sampling) -> web.StreamResponse:  # fmt: skip
        assert self.scheduler is not None
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
            assert self.scheduler is not None
            try:
                return await self.scheduler.generate(images, messages, cancel, on_text, limit, on_prompt, sampling)
            finally:
                loop.call_soon_threadsafe(pieces.put_nowait, None)

        task = asyncio.ensure_future(generate())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a client that left never reads it
        ident = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        logprobs = sampling.logprobs is not None
        options = body.stream_options or StreamOptions()
        response: web.StreamResponse | None = None
        try:
            if not body.stream:
                gen = await task
                self.served += 1
                return web.json_response(self._completion(ident, gen, logprobs), headers=self._headers)
            headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **self._headers}
            response = web.StreamResponse(headers=headers)
            await response.prepare(http)
            await response.write(self._chunk(ident, {"role": "assistant", "content": ""}, None))
            # vLLM's continuous_usage_stats: usage on every chunk, so a client that stops
            # reading early (the answer contract closed) still has the prompt's length.
            while (piece := await pieces.get()) is not None:
                tokens = piece.tokens if isinstance(piece, Piece) else 0
                so_far = {"prompt_tokens": prompt[0], "completion_tokens": tokens, "total_tokens": prompt[0] + tokens}
                entries = piece.logprobs if isinstance(piece, Piece) else ()
                await response.write(self._chunk(ident, {"content": str(piece)}, None,
                                                 so_far if options.continuous_usage_stats else None,
                                                 logprobs_of(entries) if logprobs else None))  # fmt: skip
            gen = await task
            await response.write(self._chunk(ident, {}, finish_reason(gen)))
            if options.include_usage:
                last = {**self._base(ident, "chat.completion.chunk"), "choices": [], "usage": usage(gen)}
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
                return _error(500, f"generation failed: {exc}", "server_error")
            # Mid-stream: say so in the stream and end it, or the client waits for its timeout.
            failed = {"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None,
                                "code": None}}  # fmt: skip
            await response.write(_sse(failed))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response

    def _base(self, ident: str, kind: str) -> dict[str, Any]:
        return {"id": ident, "object": kind, "created": int(time.time()), "model": self.model_id,
                "system_fingerprint": self.fingerprint}  # fmt: skip

    def _chunk(self, ident: str, delta: dict[str, str], finish: str | None, usage: dict[str, int] | None = None,
               logprobs: dict[str, Any] | None = None) -> bytes:  # fmt: skip
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        chunk = {**self._base(ident, "chat.completion.chunk"), "choices": [choice]}
        return _sse({**chunk, "usage": usage} if usage else chunk)

    def _completion(self, ident: str, gen: Generation, logprobs: bool) -> dict[str, Any]:
        message = {"role": "assistant", "content": gen.text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": logprobs_of(gen.logprobs or []) if logprobs else None,
                  "finish_reason": finish_reason(gen)}  # fmt: skip
        return {**self._base(ident, "chat.completion"), "choices": [choice], "usage": usage(gen)}


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> web.Response:  # fmt: skip
    """An error as OpenAI's API gives it."""
    error = {"message": message, "type": kind, "param": param, "code": code}
    return web.json_response({"error": error}, status=status)

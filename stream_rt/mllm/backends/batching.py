"""Continuous batching for ``stream-rt worker``: every request under way decodes in one
forward pass per step, and a request that arrives meanwhile joins the batch at the next
step instead of waiting for the others to finish (vLLM's continuous batching, in small).

Each request is encoded and prefilled on its own (prompts differ in length); its K/V
cache then joins the batch's, left-padded to a common length under an attention mask, and
its positions stay its own. A request leaves the batch the step it ends — end of sequence,
its answer's JSON object closed, a stop string, its token limit, its client gone — and the
columns no request needs any more are cut. Each request chooses its tokens as it would
alone (:class:`~stream_rt.mllm.backends.decoding.TokenStream`: greedy, or sampled from a generator
of its own), so its answer is the one it gets decoded by itself, up to float rounding in
the padded attention.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from stream_rt.mllm.backends.decoding import Generation, Sampling, TokenStream
from stream_rt.mllm.backends.transformers_backend import TransformersBackend, on_device
from stream_rt.mllm.prompt import Prompt, chat_messages

log = logging.getLogger(__name__)

MAX_BATCH = 8
"""Requests decoded together at most; more wait for a place."""


@dataclass
class _Job:
    images: list[npt.NDArray[np.uint8]]
    text: Prompt
    cancel: threading.Event
    on_text: Callable[[str], None] | None
    max_new_tokens: int | None
    on_prompt: Callable[[int], None] | None
    sampling: Sampling | None = None
    result: concurrent.futures.Future[Generation] = field(default_factory=concurrent.futures.Future)

    @property
    def abandoned(self) -> bool:
        """Its client has gone, or its answer is settled already."""
        return self.cancel.is_set() or self.result.done()

    def settle(self, value: Generation | BaseException) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # its client gave up on it
            if isinstance(value, BaseException):
                self.result.set_exception(value)
            else:
                self.result.set_result(value)


@dataclass
class _Row:
    """A request in the batch: its decoding so far and the token it feeds next (of its
    prompt only what decoding needs, so the images and pixel tensors are let go)."""

    job: _Job
    length: int  # the prompt's tokens
    image_tokens: int
    next_position: int
    three_d: bool  # multimodal rotary positions (three axes)
    stream: TokenStream
    encode_s: float
    prefill_s: float
    joined: float
    token: int = 0


class ContinuousBatch:
    """Generations for ``backend`` (its plain path: no token reuse, memory or layer exit),
    run on the backend's model thread, at most ``max_batch`` decoding at once. While some
    decode, one new request is prefilled per step, so a burst of arrivals never stalls
    the streams under way for more than one prefill at a time. A request whose client
    has gone (its ``cancel`` set) is dropped before it costs a prefill."""

    kind = "continuous batching"

    def __init__(self, backend: TransformersBackend, max_batch: int = MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.backend = backend
        self.max_batch = max_batch
        self.largest = 0  # the most requests decoded in one step so far
        self.progressed = time.monotonic()  # when a prefill or a step last ended
        self._lock = threading.Lock()
        self._waiting: list[_Job] = []
        self._joining: list[_Job] = []  # taken from the waiting, not yet in the batch
        self._rows: list[_Row] = []
        self._running = False
        self._runs: set[asyncio.Future[None]] = set()

    async def generate(
        self,
        images: list[npt.NDArray[np.uint8]],
        text: Prompt,
        cancel: threading.Event,
        on_text: Callable[[str], None] | None = None,
        max_new_tokens: int | None = None,
        on_prompt: Callable[[int], None] | None = None,
        sampling: Sampling | None = None,
    ) -> Generation:
        """What :meth:`TransformersBackend.generate` gives for these, decoded in the batch.
        ``on_text`` and ``on_prompt`` are called on the model thread. Cancelling the
        awaiting task ends the generation at its next step."""
        job = _Job(images, text, cancel, on_text, max_new_tokens, on_prompt, sampling)
        with self._lock:
            self._waiting.append(job)
            start, self._running = not self._running, True
        if start:
            run = asyncio.ensure_future(self.backend.in_model_thread(self._run))
            self._runs.add(run)
            run.add_done_callback(self._run_ended)
        try:
            return await asyncio.wrap_future(job.result)
        except asyncio.CancelledError:
            cancel.set()
            raise

    def cancel_all(self) -> None:
        """End every generation at its next step (the worker is stopping)."""
        with self._lock:
            for job in self._waiting + self._joining + [row.job for row in self._rows]:
                job.cancel.set()

    def _run_ended(self, run: asyncio.Future[None]) -> None:
        self._runs.discard(run)
        if run.cancelled():  # (it may never have started): the next request starts another
            with self._lock:
                self._running = False

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as exc:  # a fault of the batch itself: no request is left waiting
            log.exception("worker: the batch failed")
            with self._lock:
                jobs = self._waiting + self._joining + [row.job for row in self._rows]
                self._waiting, self._joining, self._rows, self._running = [], [], [], False
            for job in jobs:
                job.settle(exc)

    def _loop(self) -> None:
        rows = self._rows
        cache: Any = None
        mask: torch.Tensor | None = None
        while True:
            with self._lock:
                for job in [job for job in self._waiting if job.abandoned]:
                    job.settle(Generation("", [], "cancelled", 0, 0, 0.0, 0.0, 0.0))  # never prefilled
                    self._waiting.remove(job)
                room = self.max_batch - len(rows)
                admit = min(room, 1) if rows else room
                self._joining, self._waiting = self._waiting[:admit], self._waiting[admit:]
                if not rows and not self._joining:
                    self._running = False
                    return
            for job in self._joining:
                try:
                    row, row_cache = self._prefill(job)
                    if row is not None:
                        cache, mask = self._joined(cache, mask, row_cache, row.length)
                        rows.append(row)
                except Exception as exc:
                    job.settle(exc)
                self.progressed = time.monotonic()
            self._joining = []
            if not rows:
                continue
            assert mask is not None
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            try:
                logits = self._step(rows, cache, mask)
            except Exception as exc:
                for row in rows:
                    row.job.settle(exc)
                rows.clear()
                cache = mask = None
                continue
            self.progressed = time.monotonic()
            self.largest = max(self.largest, len(rows))
            keep = [i for i, row in enumerate(rows) if self._advance(row, logits[i])]
            if len(keep) < len(rows):
                rows[:] = [rows[i] for i in keep]
                cache, mask = self._selected(cache, mask, keep)

    def _prefill(self, job: _Job) -> tuple[_Row | None, Any]:
        """Encode and prefill ``job`` alone; its row (``None`` if it ended at its first
        token) and its K/V cache."""
        backend, family = self.backend, self.backend.family
        assert family is not None
        started = time.perf_counter()
        prepared = on_device(family.prepare(job.images, chat_messages(len(job.images), job.text), backend.model),
                             backend.device)  # fmt: skip
        features = family.encode(backend.model, prepared) if prepared.vision else None
        encoded = time.perf_counter()
        logits, cache = backend.prefill(prepared, features)
        prefilled = time.perf_counter()
        if job.on_prompt is not None:
            job.on_prompt(prepared.length)
        stream = backend.token_stream(job.max_new_tokens, job.cancel, job.on_text, job.sampling)
        three_d = prepared.position_ids is not None and prepared.position_ids.dim() == 3
        row = _Row(job, prepared.length, int(prepared.image_mask.sum()), prepared.next_position, three_d, stream,
                   encoded - started, prefilled - encoded, prefilled)  # fmt: skip
        return (row, cache) if self._advance(row, logits[0]) else (None, None)

    def _advance(self, row: _Row, logits: torch.Tensor) -> bool:
        """Take ``row``'s next token; false (and its answer settled) once it has ended."""
        token = row.stream.take(logits)
        if token is not None:
            row.token = token
            return True
        stream = row.stream
        row.job.settle(Generation(
            stream.text, stream.ids, stream.stop, row.length, row.image_tokens, row.encode_s, row.prefill_s,
            time.perf_counter() - row.joined, logprobs=stream.logprobs,
        ))  # fmt: skip
        return False

    def _step(self, rows: list[_Row], cache: Any, mask: torch.Tensor) -> torch.Tensor:
        """One forward pass for every row's next token; the last position's logits per row."""
        backend = self.backend
        device = backend.device
        tokens = torch.tensor([[row.token] for row in rows], device=device)
        positions = torch.tensor([[row.next_position + len(row.stream.ids) - 1] for row in rows], device=device)
        if rows[0].three_d:  # multimodal rotary positions: three equal axes for text
            positions = positions.unsqueeze(0).expand(3, -1, -1)
        out = backend.model.get_decoder()(
            inputs_embeds=backend.model.get_input_embeddings()(tokens), position_ids=positions,
            attention_mask=mask.to(device), use_cache=True, **{backend.cache_kw: cache},
        )  # fmt: skip
        return backend.model.lm_head(out.last_hidden_state[:, -1]).float()

    def _joined(self, cache: Any, mask: torch.Tensor | None, row_cache: Any, length: int) -> tuple[Any, torch.Tensor]:
        """The batch's cache and mask with a new row (its cache ``length`` long) at the end."""
        row_mask = torch.ones(1, length, dtype=torch.long)
        if cache is None or mask is None:
            return row_cache, row_mask
        width = max(mask.shape[1], length)
        pairs = list(zip(cache.layers, row_cache.layers, strict=True))
        keys = [torch.cat([_pad_left(a.keys, width), _pad_left(b.keys, width)]) for a, b in pairs]
        values = [torch.cat([_pad_left(a.values, width), _pad_left(b.values, width)]) for a, b in pairs]
        masks = [torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in (mask, row_mask)]
        return self.backend.cache_of(keys, values), torch.cat(masks)

    def _selected(self, cache: Any, mask: torch.Tensor, keep: list[int]) -> tuple[Any, torch.Tensor | None]:
        """The batch's cache and mask with only the rows ``keep``, cut of the columns they all pad."""
        if not keep:
            return None, None
        index = torch.tensor(keep)
        mask = mask[index]
        first = int(mask.any(dim=0).nonzero()[0, 0])
        keys = [layer.keys[index, :, first:] for layer in cache.layers]
        values = [layer.values[index, :, first:] for layer in cache.layers]
        return self.backend.cache_of(keys, values), mask[:, first:]


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, 0, width - tensor.shape[2], 0))

"""How ``stream-rt worker`` runs the generations its clients ask for, whatever the model.

A :class:`Scheduler` takes one generation at a time from the worker and answers it; the
worker bounds how many wait (``max_batch`` decoding plus its ``max_waiting``) and never
asks which scheduler it has. :func:`scheduler_for` picks one for a loaded backend:

- a family with an adapter: :class:`~stream_rt.mllm.backends.batching.ContinuousBatch`, up to
  ``max_batch`` requests decoded in one forward pass per token;
- any other model (the generic path, transformers' ``generate``, one sequence at a time):
  :class:`OneAtATime`, each generation in turn on the backend's model thread.

Both stream text as it is decoded, end a generation whose ``cancel`` is set at its next
token (one whose client left before its turn costs nothing), choose tokens as its
:class:`~stream_rt.mllm.backends.decoding.Sampling` says, and note in ``progressed`` when the model
last got on (for the worker's health).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt

from stream_rt.mllm.backends.batching import MAX_BATCH, ContinuousBatch
from stream_rt.mllm.backends.decoding import Generation, Sampling
from stream_rt.mllm.backends.transformers_backend import TransformersBackend
from stream_rt.mllm.prompt import Prompt


class Scheduler(Protocol):
    @property
    def max_batch(self) -> int:
        """Generations decoded at once at most."""
        ...

    @property
    def progressed(self) -> float:
        """When (``time.monotonic()``) a generation last got on: prefilled, or a token decoded."""
        ...

    @property
    def kind(self) -> str:
        """How generations run, in words (for logs and the health route)."""
        ...

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
        """One answer; ``on_text`` and ``on_prompt`` are called on the model thread.
        Cancelling the awaiting task, or setting ``cancel``, ends it at its next token."""
        ...

    def cancel_all(self) -> None:
        """End every generation under way or waiting at its next token (the worker is stopping)."""
        ...


class OneAtATime:
    """Generations for ``backend`` one after another on its model thread, through
    :meth:`TransformersBackend.generate` (the generic path, or any path)."""

    max_batch = 1
    kind = "one at a time"

    def __init__(self, backend: TransformersBackend) -> None:
        self.backend = backend
        self.progressed = time.monotonic()
        self._cancels: set[threading.Event] = set()

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
        def got_on() -> None:
            self.progressed = time.monotonic()

        def prompt(tokens: int) -> None:
            got_on()
            if on_prompt is not None:
                on_prompt(tokens)

        def piece(text: str) -> None:
            got_on()
            if on_text is not None:
                on_text(text)

        def run() -> Generation:
            if cancel.is_set():  # its client left while it waited: nothing to prepare
                return Generation("", [], "cancelled", 0, 0, None, 0.0, 0.0)
            got_on()
            return self.backend.generate(images, text, cancel, piece, max_new_tokens, on_prompt=prompt,
                                         sampling=sampling)  # fmt: skip

        self._cancels.add(cancel)
        try:
            return await self.backend.in_model_thread(run)
        except asyncio.CancelledError:
            cancel.set()  # the thread stops at its next token
            raise
        finally:
            self._cancels.discard(cancel)

    def cancel_all(self) -> None:
        for cancel in list(self._cancels):
            cancel.set()


def scheduler_for(backend: TransformersBackend, max_batch: int | None = None) -> Scheduler:
    """Continuous batching where the model's family has an adapter, one at a time
    otherwise (``backend`` loaded)."""
    assert backend.family is not None, "load the backend first"
    if backend.family.adapter:
        return ContinuousBatch(backend, max_batch or MAX_BATCH)
    return OneAtATime(backend)

"""The interface every MLLM backend implements, and its errors.

A backend answers one :class:`~stream_rt.graph.packets.MllmRequest` at a time with
``await backend.answer(request, on_text)``: the work runs off the event loop (a socket for
servers; for local models the backend's **own thread**, :meth:`Backend.in_model_thread`,
:mod:`stream_rt.mllm.model_thread`), text is streamed to ``on_text`` as it is decoded,
and cancelling the awaiting task stops the generation at the next token. Work that cannot
be interrupted (a vision encoder or a prefill that hangs) keeps the model's thread after
its caller gave up: ``busy_since`` says since when, and the stage reports the backend
stuck until it returns; later work waits behind it, never on a second thread. Timeouts,
flow limiting and answer reuse belong to :class:`~stream_rt.mllm.stage.MllmStage`, so
every backend gets them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from stream_rt.graph.packets import MllmAnswer, MllmRequest
from stream_rt.mllm.contract import parse_answer
from stream_rt.mllm.model_thread import ModelThread

OnText = Callable[[str], None]


CLOSE_GRACE_S = 2.0
"""How long closing a backend waits for a call under way on its model thread."""


class BackendError(RuntimeError):
    """A backend cannot answer; ``str()`` says why in one line."""


class ModelUnavailable(BackendError):
    """The model cannot be used here (its weights are missing, transformers cannot load
    it, or a configured technique does not work with it): a configuration to fix, which
    stops the daemon at start."""


class MissingWeights(ModelUnavailable):
    """The model's weights are not on this machine and cannot be downloaded."""


T = TypeVar("T")


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


class Backend:
    """``name`` identifies the model in answers and metrics; ``smoke`` marks a backend
    whose answers are not meaningful (the smoke model). ``busy_since``: the monotonic
    time (``time.monotonic()``) at which the model's thread took its current work, or
    ``None`` while it is idle."""

    name: str = "backend"
    smoke: bool = False
    _thread: ModelThread | None = None

    @property
    def busy_since(self) -> float | None:
        return self._thread.busy_since if self._thread is not None else None

    async def in_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the model's one thread (started on first use) and wait for it."""
        if self._thread is None:
            self._thread = ModelThread(f"stream_rt-model-{self.name}"[:60])
        return await self._thread.run(fn, *args)

    def check(self) -> str:
        """Check, without loading anything, that the backend can work as configured; one
        line saying what it will use. Raises :class:`ModelUnavailable` otherwise."""
        return self.name

    async def start(self) -> None:
        """Load what the backend needs (weights, connections); called once before use."""

    async def answer(self, request: MllmRequest, on_text: OnText | None = None) -> MllmAnswer:
        """Answer one request. Raises :class:`BackendError` (or anything else) on failure."""
        raise NotImplementedError

    def counters(self) -> dict[str, int]:
        """Totals the backend keeps (e.g. token-reuse cache evictions), shown with the stage's counters."""
        return {}

    def gauges(self) -> dict[str, float]:
        """Levels the backend holds now (e.g. the token-reuse cache's size), shown with the stage's gauges."""
        return {}

    async def close(self) -> None:
        """Release what :meth:`start` took (subclasses call this too). A call under way
        gets up to ``CLOSE_GRACE_S`` to finish (a process that exits while its model thread
        is inside the model can abort: "terminate called without an active exception").
        An idle model thread ends; one still stuck in a call is kept, so that work after a
        restart waits behind it instead of running the model on a second thread."""
        deadline = time.monotonic() + CLOSE_GRACE_S
        while self._thread is not None and self._thread.busy_since is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._thread is not None and self._thread.idle:
            self._thread.close()
            self._thread = None


def answer_from_text(
    request: MllmRequest,
    text: str,
    backend: Backend,
    *,
    stop: str,
    timings: dict[str, float],
    tokens: dict[str, int],
    smoke: bool | None = None,
    exit_depth: float | None = None,
    visual_summary: npt.NDArray[np.float32] | None = None,
) -> MllmAnswer:
    """The model's ``text`` for ``request``, checked against the answer contract: status
    ``ok`` with the validated answer, or ``invalid`` saying why."""
    answer, error = parse_answer(text)
    return MllmAnswer(
        request.source_id, request.seq, request.pts_ns, time.time_ns(), request.event_id, request.question,
        "ok" if answer is not None else "invalid", answer, text, backend.name,
        backend.smoke if smoke is None else smoke, error, stop, timings, tokens, exit_depth, visual_summary,
        frame_pts=request.frame_pts,
    )  # fmt: skip

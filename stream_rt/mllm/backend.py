"""The interface every MLLM backend implements, and its errors.

A backend answers one :class:`~stream_rt.graph.packets.MllmRequest` at a time with
``await backend.answer(request, on_text)``: the work runs off the event loop (a thread for
local models, a socket for servers), text is streamed to ``on_text`` as it is decoded, and
cancelling the awaiting task stops the generation at the next token. Timeouts, flow
limiting and answer reuse belong to :class:`~stream_rt.mllm.stage.MllmStage`, so every
backend gets them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from stream_rt.graph.packets import MllmAnswer, MllmRequest
from stream_rt.mllm.contract import parse_answer

OnText = Callable[[str], None]


class BackendError(RuntimeError):
    """A backend cannot answer; ``str()`` says why in one line."""


class MissingWeights(BackendError):
    """The model's weights are not on this machine and cannot be downloaded."""


class Backend:
    """``name`` identifies the model in answers and metrics; ``smoke`` marks a backend
    whose answers are not meaningful (the smoke model)."""

    name: str = "backend"
    smoke: bool = False

    async def start(self) -> None:
        """Load what the backend needs (weights, connections); called once before use."""

    async def answer(self, request: MllmRequest, on_text: OnText | None = None) -> MllmAnswer:
        """Answer one request. Raises :class:`BackendError` (or anything else) on failure."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what :meth:`start` took."""


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
    )  # fmt: skip

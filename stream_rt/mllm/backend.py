"""The interface every MLLM backend implements, and its errors.

A backend answers one :class:`~stream_rt.graph.packets.MllmRequest` at a time with
``await backend.answer(request, on_text)``: the work runs off the event loop (a thread for
local models, a socket for servers), text is streamed to ``on_text`` as it is decoded, and
cancelling the awaiting task stops the generation at the next token. Timeouts, flow
limiting and answer reuse belong to :class:`~stream_rt.mllm.stage.MllmStage`, so every
backend gets them.
"""

from __future__ import annotations

from collections.abc import Callable

from stream_rt.graph.packets import MllmAnswer, MllmRequest

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

"""The answer records the stage writes itself (a request it could not call for, an answer
given again), and the marking of repeats."""

from __future__ import annotations

import dataclasses

from stream_rt.graph.packets import AnswerStatus, Event, MllmAnswer, MllmRequest
from stream_rt.mllm.backend import Backend


def bare_request(event: Event, question: str) -> MllmRequest:
    """What an event asked, without its pictures (to answer it when building failed)."""
    return MllmRequest(event.source_id, event.seq, event.pts_ns, event.wall_ns, event.event_id,
                       event.question or question)  # fmt: skip


def reused(request: MllmRequest, answer: MllmAnswer, wall_ns: int) -> MllmAnswer:
    """``answer`` given again, for ``request``, at ``wall_ns``."""
    return dataclasses.replace(
        answer, source_id=request.source_id, seq=request.seq, pts_ns=request.pts_ns, wall_ns=wall_ns,
        event_id=request.event_id, status="reused", timings={}, tokens={},
    )  # fmt: skip


def failed(
    request: MllmRequest, status: AnswerStatus, error: str, wall_ns: int, backend: Backend | None = None,
    took_s: float | None = None,
) -> MllmAnswer:  # fmt: skip
    """The answer to ``request`` that the model did not give (``took_s``: how long the call
    ran before it failed)."""
    timings = {"total": took_s} if took_s is not None else {}
    return MllmAnswer(
        request.source_id, request.seq, request.pts_ns, wall_ns, request.event_id, request.question,
        status, None, "", backend.name if backend else "", bool(backend and backend.smoke), error, "", timings,
        frame_pts=request.frame_pts,
    )  # fmt: skip


class Repeats:
    """Marks an answer ``repeat`` when it says what its source's last answer said in the
    same episode (its ``confidence`` aside)."""

    def __init__(self) -> None:
        self._last_said: dict[str, tuple[str, dict[str, object]]] = {}  # per source: (event id, its say)

    def mark(self, answer: MllmAnswer) -> MllmAnswer:
        if answer.status not in ("ok", "reused") or answer.answer is None:
            return answer
        said = (answer.event_id, {k: v for k, v in answer.answer.items() if k != "confidence"})
        last, self._last_said[answer.source_id] = self._last_said.get(answer.source_id), said
        return dataclasses.replace(answer, repeat=True) if last == said else answer

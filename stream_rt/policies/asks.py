"""Questions asked about sources (the MQTT ``ask`` command): the promise of an answer, the
queue each waits in, and its deadline.

Acknowledging an ``ask`` is a promise: an ``ask`` event, then one answer.

- :class:`AskLedger` keeps the promises: a question reserves a place before it is
  acknowledged (:meth:`AskLedger.reserve`), and the MLLM stage releases it once that
  event's answer is out (:meth:`AskLedger.release`), whatever the answer's status. A
  source with ``max_open`` questions still open refuses the next one instead of
  accepting what it could not keep.
- :class:`AskQueue` holds each source's questions until the trigger turns them into
  ``ask`` events: at the source's next step, or once they have waited the source's
  ``ask_wait_s`` (:meth:`AskQueue.overdue`: a camera that is up but sends nothing, a
  source no gate watches), or when the source goes offline or ends. It refuses
  (:class:`AskRefused`) a question about a source that is offline or has ended: nothing
  could be looked at. The trigger tells it each source's life
  (:meth:`AskQueue.source_online`, :meth:`AskQueue.source_offline`,
  :meth:`AskQueue.source_ended`).

The pipeline makes one ledger and one queue and hands the queue to the trigger and to the
command target (:mod:`stream_rt.policies.control`), the ledger to the MLLM stage.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from stream_rt.graph.clock import Clock
from stream_rt.graph.ids import time_ordered_id


class AskRefused(ValueError):
    """The question cannot be taken now; ``str()`` says why in one line."""


class AskLedger:
    def __init__(self, max_open: int = 8) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.max_open = max_open
        self._open: dict[str, set[str]] = {}

    def reserve(self, source_id: str, event_id: str) -> None:
        """Record ``event_id`` as owed an answer; raises :class:`AskRefused` when the source
        already has ``max_open`` open questions."""
        open_ = self._open.setdefault(source_id, set())
        if len(open_) >= self.max_open:
            raise AskRefused(
                f"{len(open_)} questions about '{source_id}' are still waiting for their answers: ask again later"
            )
        open_.add(event_id)

    def release(self, source_id: str, event_id: str) -> None:
        """The answer to ``event_id`` is out (unknown ids are ignored)."""
        self._open.get(source_id, set()).discard(event_id)


@dataclass
class Question:
    event_id: str
    question: str
    asked_ns: int | None  # on the graph clock (None: not yet seen by a clock)


@dataclass
class _Source:
    waiting: deque[Question] = field(default_factory=deque)  # bounded by the ledger
    online: bool = True  # until the source says otherwise
    ended: bool = False  # its stream ended for good


class AskQueue:
    def __init__(self, ledger: AskLedger | None = None, clock: Clock | None = None) -> None:
        """``clock``: the graph's, to time each question from when it is asked (without it,
        from the first deadline pass that sees it)."""
        self.ledger = ledger if ledger is not None else AskLedger()
        self._clock = clock
        self._sources: dict[str, _Source] = {}
        self._all_ended = False

    def _source(self, source_id: str) -> _Source:
        return self._sources.setdefault(source_id, _Source())

    def ask(self, source_id: str, question: str) -> str:
        """Queue a question about a source; returns the id its ``ask`` event (and answer)
        will carry. Raises :class:`AskRefused` when it cannot be kept (the source offline or
        ended, too many questions still open)."""
        source = self._source(source_id)
        if source.ended or self._all_ended:
            raise AskRefused(f"source '{source_id}' has ended: nothing to look at")
        if not source.online:
            raise AskRefused(f"source '{source_id}' is offline: nothing to look at")
        event_id = f"{source_id}-{time_ordered_id()}"
        self.ledger.reserve(source_id, event_id)
        source.waiting.append(Question(event_id, question, self._clock.now_ns() if self._clock else None))
        return event_id

    def waiting(self, source_id: str) -> int:
        """How many questions about ``source_id`` wait for their event."""
        source = self._sources.get(source_id)
        return len(source.waiting) if source is not None else 0

    def take(self, source_id: str) -> list[Question]:
        """The questions waiting about ``source_id``, oldest first (they leave the queue)."""
        source = self._sources.get(source_id)
        if source is None:
            return []
        taken = list(source.waiting)
        source.waiting.clear()
        return taken

    def overdue(self, now_ns: int, wait_ns: Callable[[str], int]) -> list[str]:
        """The sources whose oldest question has waited ``wait_ns(source)`` or longer."""
        late = []
        for source_id, source in list(self._sources.items()):
            for question in source.waiting:
                if question.asked_ns is None:
                    question.asked_ns = now_ns
            asked = source.waiting[0].asked_ns if source.waiting else None
            if asked is not None and now_ns - asked >= wait_ns(source_id):
                late.append(source_id)
        return late

    def source_online(self, source_id: str) -> None:
        self._source(source_id).online = True

    def source_offline(self, source_id: str) -> None:
        self._source(source_id).online = False

    def source_ended(self, source_id: str | None = None) -> None:
        """``source_id``'s stream ended for good (``None``: every source's)."""
        if source_id is None:
            self._all_ended = True
        else:
            self._source(source_id).ended = True

"""The questions asked about sources (the MQTT ``ask`` command) that still owe an answer.

Acknowledging an ``ask`` is a promise: an ``ask`` event, then one answer. The trigger
reserves a place here before it acknowledges (:meth:`AskLedger.reserve`), and the MLLM
stage releases it once that event's answer is out (:meth:`AskLedger.release`), whatever
the answer's status. A source with ``max_open`` questions still open refuses the next
one instead of accepting what it could not keep.
"""

from __future__ import annotations


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

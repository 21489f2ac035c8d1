"""Ask the model about the past: it answers from entries of the history, citing them.

:func:`ask_history` searches the history for the question (hybrid search, optionally
within a source and a span of time), gives the model the entries it found — one line
each, led by its event id — and asks it to answer in the usual answer contract, citing
in its summary the event ids it used. The citations are checked, never trusted:

- ``cited``: the ids in the model's text that are among the entries it was given;
- ``dropped``: what the model wrote that looks like an id but was not given to it (made
  up, or mangled): removed from the citations, and said in ``note``;
- ``sources``: the ids of every entry the model was given, best match first, always, so
  a reader can check the answer even when the model cites nothing (a small or random
  model), which ``note`` then says.

An entry that belongs to no event (speech outside any episode) is labelled
``entry:<number>`` instead. Nothing found: no call is made, and the answer says so.
The request is text only, through whatever :class:`~stream_rt.mllm.backend.Backend` the
daemon runs (``source_id`` ``history``).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream_rt.graph.ids import time_ordered_id
from stream_rt.graph.packets import MllmRequest
from stream_rt.memory.history import History, HistoryEntry, When
from stream_rt.memory.streaming import Embedder
from stream_rt.memory.when import parse_when
from stream_rt.mllm.backend import Backend
from stream_rt.sinks.commands import HistoryQuestion

ENTRY_CHARS = 300
"""The most characters of one entry's text the model is shown."""

INSTRUCTIONS = (
    "You answer questions about what a camera system saw and heard, using only its history below. "
    "Each line is one entry: [id] local time, source, kind: what was recorded."
)

ID_LIKE = re.compile(r"(?:[\w.-]+-[0-9A-HJKMNP-TV-Z]{26}|entry:\d+)(?![0-9A-Za-z])")
"""What a citation looks like: an event id (``<source>-<ULID>``) or ``entry:<number>``."""


@dataclass(frozen=True)
class HistoryAnswer:
    """The model's answer to a question about the past (see the module docstring):
    ``status`` (the model's: ``ok``, ``invalid``, ``error``...; ``empty`` when nothing was
    found and no call made), ``answer`` (the contract's fields), ``text`` (the model's own
    words), ``cited``, ``dropped``, ``sources``, ``note``; ``entries``: those retrieved;
    ``smoke``: the model has random weights (the answer is not meaningful)."""

    question: str
    status: str
    answer: dict[str, Any] | None
    text: str
    cited: list[str]
    dropped: list[str]
    sources: list[str]
    note: str
    model: str
    smoke: bool = False
    error: str = ""
    entries: list[HistoryEntry] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "question": self.question, "status": self.status, "answer": self.answer, "text": self.text,
            "cited": self.cited, "dropped": self.dropped, "sources": self.sources, "note": self.note,
            "model": self.model, "error": self.error,
            "entries": [{**e.to_record(), "label": label(e)} for e in self.entries],
        }  # fmt: skip
        if self.smoke:
            record["smoke"] = "smoke model with random weights: this answer is not meaningful"
        return record


def label(entry: HistoryEntry) -> str:
    """How the model sees (and cites) an entry: its event id, or ``entry:<number>``."""
    return entry.event_id or f"entry:{entry.id}"


def history_request(question: str, entries: list[HistoryEntry], wall_ns: int) -> MllmRequest:
    """The text-only request: the entries, one line each, then the question."""
    lines = [INSTRUCTIONS]
    for e in entries:
        text = e.text if len(e.text) <= ENTRY_CHARS else e.text[: ENTRY_CHARS - 3] + "..."
        lines.append(f"[{label(e)}] {e.time:%Y-%m-%d %H:%M:%S}, {e.source_id}, {e.kind}: {text}")
    ask = f"{question}\nIn the summary, cite in square brackets the ids of the entries you used."
    return MllmRequest("history", 0, 0, wall_ns, f"history-{time_ordered_id()}", ask, context="\n".join(lines))


def check_citations(text: str, given: list[str]) -> tuple[list[str], list[str]]:
    """The ids ``text`` cites that are among ``given`` (in ``given``'s order), and those it
    cites that are not (in the order written)."""
    cited = [g for g in given if re.search(rf"(?<![\w:.-]){re.escape(g)}(?![\w:])", text)]
    written = ID_LIKE.findall(text)
    dropped = list(dict.fromkeys(w for w in written if w not in given and not any(w in c for c in cited)))
    return cited, dropped


async def ask_history(
    history: History,
    backend: Backend,
    question: str,
    *,
    source: str | None = None,
    since: When | None = None,
    until: When | None = None,
    entries: int = 12,
) -> HistoryAnswer:
    """Answer ``question`` from the history (see the module docstring). Raises
    :class:`ValueError` for a time it cannot read; a failing model gives status ``error``."""
    found = await asyncio.to_thread(history.search, question, source, since, until, entries)
    sources = list(dict.fromkeys(label(e) for e in found))
    if not found:
        return HistoryAnswer(question, "empty", None, "", [], [], [], "nothing in the history matches the question",
                             backend.name)  # fmt: skip
    try:
        answer = await backend.answer(history_request(question, found, time.time_ns()))
    except Exception as exc:
        return HistoryAnswer(question, "error", None, "", [], [], sources, "the model failed",
                             backend.name, backend.smoke, str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                             found)  # fmt: skip
    cited, dropped = check_citations(answer.text, sources)
    notes = []
    if dropped:
        notes.append(f"dropped {len(dropped)} cited id(s) that were not among the entries given: {', '.join(dropped)}")
    if not cited:
        notes.append("the model cited none of the entries it was given; 'sources' lists them, best match first")
    return HistoryAnswer(question, answer.status, answer.answer, answer.text, cited, dropped, sources, "; ".join(notes),
                         answer.model, answer.smoke, answer.error, found)  # fmt: skip


class HistoryAsker:
    """Answers the daemon's questions about the past (the MQTT sink's
    :class:`~stream_rt.sinks.commands.HistoryTarget`): the history at ``path`` (opened on
    the first question, searched with ``embedder``), the daemon's ``backend``, its
    ``sources``; ``entries`` retrieved per question, ``timeout_s`` for the model's answer."""

    def __init__(
        self,
        path: Path,
        backend: Backend,
        embedder: Embedder | None,
        sources: set[str],
        entries: int = 12,
        timeout_s: float = 60.0,
    ) -> None:
        self.path = path
        self.backend = backend
        self.embedder = embedder
        self.sources = sources
        self.entries = entries
        self.timeout_s = timeout_s
        self._history: History | None = None

    def check(self, question: HistoryQuestion) -> None:
        """Refuse (ValueError) an unknown source or a time that cannot be read."""
        if question.source is not None and question.source not in self.sources:
            raise ValueError(f"unknown source '{question.source}' (sources: {', '.join(sorted(self.sources))})")
        now = time.time_ns()
        for name in ("since", "until"):
            value = getattr(question, name)
            if value is not None:
                try:
                    parse_when(value, now)
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None

    async def answer(self, question: HistoryQuestion) -> dict[str, Any]:
        if self._history is None:
            self._history = await asyncio.to_thread(History, self.path, embedder=self.embedder)
        answer = await asyncio.wait_for(
            ask_history(self._history, self.backend, question.question.strip(), source=question.source,
                        since=question.since, until=question.until, entries=self.entries),
            self.timeout_s,
        )  # fmt: skip
        return answer.to_record()

    def close(self) -> None:
        if self._history is not None:
            self._history.close()
            self._history = None

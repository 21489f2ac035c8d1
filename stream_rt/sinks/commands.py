"""Commands that arrive on ``<prefix>/<source>/<feature>/set``, validated before use.

- ``<source>/enabled/set``: ``ON`` or ``OFF`` (Frigate's convention): whether the source's
  salience may open episodes; turning it off ends an open episode.
- ``<source>/trigger/set``: a JSON object with any of ``on``, ``off`` (0..1, off <= on):
  that source's trigger thresholds.
- ``<source>/ask/set``: a JSON object ``{"question": "..."}``: ask the model about the
  source now; the reply names the event id its event and answer will carry. A question
  the target cannot promise to answer (no model, the source offline, too many questions
  still open) is refused, not acknowledged.
- ``<source>/watch/set``: a JSON object ``{"id": "...", "condition": "...", "expires_s":
  N, "recheck_s": M}`` (both optional, 0 = never): set the source's standing watch
  (replacing the one it had); ``OFF`` removes it.
- ``history/ask/set``: a JSON object ``{"question": "...", "source": "...", "since": "2h",
  "until": "...", "id": "..."}`` (all but ``question`` optional; times as
  :mod:`stream_rt.memory.when` reads them, ``id`` echoed in the reply): ask the model
  about the past, from the history (:func:`parse_history_question`, :class:`HistoryTarget`).

A payload that is too large, not UTF-8, not valid for its feature, or for an unknown
source or feature changes nothing and is answered with an error message.
"""

from __future__ import annotations

import json
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stream_rt.config.watches import MAX_WATCH_S, WatchId

MAX_PAYLOAD = 4096


class CommandError(ValueError):
    """The command was rejected; ``str()`` says why in one line."""


class TriggerThresholds(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    on: float | None = Field(None, ge=0, le=1)
    off: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _something_to_set(self) -> TriggerThresholds:
        if self.on is None and self.off is None:
            raise ValueError("give 'on' and/or 'off'")
        return self


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    question: str = Field(min_length=1, max_length=1000)


class WatchCommand(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: WatchId
    condition: str = Field(min_length=1, max_length=1000, pattern=r"\S")
    expires_s: float = Field(0.0, ge=0, le=MAX_WATCH_S, allow_inf_nan=False)
    recheck_s: float = Field(0.0, ge=0, le=MAX_WATCH_S, allow_inf_nan=False)


class HistoryQuestion(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    question: str = Field(min_length=1, max_length=1000, pattern=r"\S")
    source: str | None = Field(None, min_length=1, max_length=200)
    since: str | None = Field(None, min_length=1, max_length=64)
    until: str | None = Field(None, min_length=1, max_length=64)
    id: str | None = Field(None, max_length=128)


class HistoryTarget(Protocol):
    """What answers questions about the past (the pipeline hands one to the MQTT sink)."""

    def check(self, question: HistoryQuestion) -> None:
        """Raise ValueError (one line) to refuse the question before any work: a time it
        cannot read, an unknown source, too many questions open."""
        ...

    async def answer(self, question: HistoryQuestion) -> dict[str, object]:
        """The answer's record (:class:`~stream_rt.mllm.history_ask.HistoryAnswer`)."""
        ...


def parse_history_question(payload: bytes) -> HistoryQuestion:
    """A ``history/ask/set`` payload, validated; raises :class:`CommandError`."""
    if len(payload) > MAX_PAYLOAD:
        raise CommandError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD}-byte limit")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CommandError("payload is not UTF-8") from None
    try:
        return HistoryQuestion.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValidationError, ValueError, RecursionError) as exc:  # nested too deep: recursion
        raise CommandError(
            f'\'history/ask\' takes a JSON object like {{"question": "...", "since": "2h"}}: {_first_line(exc)}'
        ) from None


class CommandTarget(Protocol):
    """What commands act on (the trigger policy implements it)."""

    def set_enabled(self, source_id: str, enabled: bool) -> None: ...

    def is_enabled(self, source_id: str) -> bool: ...

    def set_thresholds(self, source_id: str, on: float | None, off: float | None) -> None: ...

    def ask(self, source_id: str, question: str) -> str:
        """Queue the question; returns its event id, raises ValueError (one line) to refuse."""
        ...

    def set_watch(self, source_id: str, watch_id: str, condition: str, expires_s: float, recheck_s: float) -> None: ...

    def remove_watch(self, source_id: str) -> None: ...


def apply_command(
    target: CommandTarget, sources: set[str], source: str, feature: str, payload: bytes
) -> dict[str, str]:
    """Validate and apply one command; returns what was done (``applied``, and the
    ``event_id`` of an ``ask``), raises :class:`CommandError`."""
    if source not in sources:
        raise CommandError(f"unknown source '{source}' (sources: {', '.join(sorted(sources))})")
    if len(payload) > MAX_PAYLOAD:
        raise CommandError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD}-byte limit")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CommandError("payload is not UTF-8") from None
    if feature == "enabled":
        if text.upper() not in ("ON", "OFF"):
            raise CommandError(f"'enabled' takes ON or OFF, got {text[:40]!r}")
        target.set_enabled(source, text.upper() == "ON")
        return {"applied": f"enabled {text.upper()}"}
    if feature == "trigger":
        try:
            thresholds = TriggerThresholds.model_validate(json.loads(text))
        except (json.JSONDecodeError, ValidationError, ValueError) as exc:
            raise CommandError(f"'trigger' takes a JSON object like {{\"on\": 0.6}}: {_first_line(exc)}") from None
        try:
            target.set_thresholds(source, thresholds.on, thresholds.off)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        return {"applied": f"trigger {thresholds.model_dump(exclude_none=True)}"}
    if feature == "ask":
        try:
            question = Question.model_validate(json.loads(text)).question.strip()
        except (json.JSONDecodeError, ValidationError, ValueError) as exc:
            raise CommandError(f'\'ask\' takes a JSON object like {{"question": "..."}}: {_first_line(exc)}') from None
        try:
            event_id = target.ask(source, question)
        except ValueError as exc:  # refused: the promise of an answer could not be kept
            raise CommandError(str(exc)) from None
        return {"applied": f"ask queued as event {event_id}", "event_id": event_id}
    if feature == "watch":
        try:
            if text.upper() == "OFF":
                target.remove_watch(source)
                return {"applied": "watch removed"}
            watch = WatchCommand.model_validate(json.loads(text))
            target.set_watch(source, watch.id, watch.condition.strip(), watch.expires_s, watch.recheck_s)
        except (json.JSONDecodeError, ValidationError) as exc:
            raise CommandError(f'\'watch\' takes OFF or a JSON object like {{"id": "guests", "condition": "..."}}: '
                               f"{_first_line(exc)}") from None  # fmt: skip
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        return {"applied": f"watch '{watch.id}' set"}
    raise CommandError(f"unknown feature '{feature}' (features: enabled, trigger, ask, watch)")


def _first_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "payload"
        return f"{where}: {error['msg']}"
    return str(exc).splitlines()[0]

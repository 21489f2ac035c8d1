"""Questions about the past over MQTT: ``<prefix>/history/ask/set`` in, one reply each on
``<prefix>/history/answers`` (QoS 1, through the outbox, not retained).

A question is validated (:func:`~stream_rt.sinks.commands.parse_history_question`) and
checked by the :class:`~stream_rt.sinks.commands.HistoryTarget` before any work; one that
is refused gets its reply at once: ``{"ok": false, "error": "<why>", "id": ...}``. An
accepted one is answered in the background (at most ``MAX_OPEN`` at a time; more are
refused), and its reply is the answer's record with ``"ok": true`` and the question's
``id``. A question still open when the sink stops is answered ``ok: false`` ("stopped").
Unlike the source commands, whose replies come on ``<source>/status``, a history
question's one reply is on the topic its answer comes on, so an asker waits on one topic.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from stream_rt.graph.node import Context, describe_error
from stream_rt.sinks.commands import CommandError, HistoryQuestion, HistoryTarget, parse_history_question
from stream_rt.sinks.mqtt.messages import Topics, encode

log = logging.getLogger("stream_rt.mqtt")

MAX_OPEN = 2
"""History questions answered at once; more are refused until one is answered."""

NO_TARGET = "this daemon answers no history questions: it needs the history on and a model ([history], [mllm])"


class HistoryAsks:
    """Takes ``history/ask/set`` payloads for ``target`` (``None``: each is refused) and
    hands each reply to ``publish(topic, payload)`` (the sink's outbox)."""

    def __init__(self, target: HistoryTarget | None, topics: Topics, publish: Callable[[str, bytes], None]) -> None:
        self.target = target
        self.topic = topics("history", "ask", "set")
        self.reply_topic = topics("history", "answers")
        self.publish = publish
        self._open: dict[asyncio.Task[None], HistoryQuestion] = {}

    def handle(self, payload: bytes, ctx: Context) -> None:
        """Refuse the question at once, or start answering it."""
        question: HistoryQuestion | None = None
        try:
            question = parse_history_question(payload)
            if self.target is None:
                raise CommandError(NO_TARGET)
            if len(self._open) >= MAX_OPEN:
                raise CommandError(f"{MAX_OPEN} history questions are being answered: ask again later")
            try:
                self.target.check(question)
            except ValueError as exc:
                raise CommandError(str(exc)) from None
        except Exception as exc:  # refused: whatever went wrong, the MQTT session goes on
            why = str(exc) if isinstance(exc, CommandError) else f"could not be read: {describe_error(exc)}"
            log.warning("refused a history question: %s", why)
            ctx.count("history_asks_refused")
            self._reply({"ok": False, "error": why, "id": question.id if question else None})
            return
        task = asyncio.create_task(self._answer(self.target, question, ctx), name="stream_rt:mqtt:history-ask")
        self._open[task] = question
        task.add_done_callback(self._open.pop)

    async def _answer(self, target: HistoryTarget, question: HistoryQuestion, ctx: Context) -> None:
        try:
            record = await target.answer(question)
        except Exception as exc:
            log.error("a history question failed: %s", describe_error(exc))
            ctx.count("history_asks_failed")
            self._reply({"ok": False, "error": f"failed: {describe_error(exc)}", "id": question.id})
            return
        ctx.count("history_asks_answered")
        self._reply({"ok": True, "id": question.id, **record})

    async def stop(self) -> None:
        """Questions still open are answered ``stopped``."""
        for task, question in list(self._open.items()):
            task.cancel()
            self._reply({"ok": False, "error": "stopped before the answer came", "id": question.id})
        await asyncio.gather(*self._open, return_exceptions=True)

    def _reply(self, record: dict[str, object]) -> None:
        self.publish(self.reply_topic, encode(record))

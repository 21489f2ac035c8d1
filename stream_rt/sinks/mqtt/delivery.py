"""From the outbox to the broker: every message committed first, forgotten once acknowledged.

:meth:`Delivery.add` commits a message to the durable :class:`~stream_rt.sinks.outbox.Outbox`;
:meth:`Delivery.send`, while connected, publishes the oldest messages a window at a
time (the broker acknowledges in order) and removes each only after its PUBACK, so an
unreachable broker, a broker restart or a crash of this process loses nothing.

Retained states (a source's status, its availability, activity, watches, last answer and
snapshot, Home Assistant's watch sensors) must be current on the broker after every
(re)connect, also on a broker that restarted without persistence and forgot them all. So
:class:`Delivery` keeps the current payload of each retained topic, and once the backlog
that was waiting at the connect is out, publishes again every state whose current payload
is not the last one published on this connection: after the older values of the backlog,
before anything newer, so the last value a subscriber receives, and the one the broker
keeps, is the current one. A state whose current value was committed after that backlog
is not published again: it goes out from the outbox, in its turn. A large state whose
history matters to no one (a snapshot) supersedes its older value still waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiomqtt

from stream_rt.graph.node import Context
from stream_rt.graph.waits import first_of
from stream_rt.sinks.outbox import Outbox

log = logging.getLogger("stream_rt.mqtt")


class Delivery:
    """The way of the outbox at ``path`` to the broker: ``window`` publishes in flight at
    once; ``closing`` set ends :meth:`send` at once (a window in flight stays in the outbox)."""

    def __init__(self, path: Path, window: int, closing: asyncio.Event) -> None:
        self.path = path
        self.window = window
        self.closing = closing
        self.outbox: Outbox | None = None  # open between open() and close()
        self.published = 0  # messages of the outbox acknowledged by the broker
        self._retained: dict[str, tuple[int, bytes]] = {}  # retained topic -> its current (outbox id, payload)
        self._wakeup = asyncio.Event()

    def open(self) -> Outbox:
        """Open the outbox (what an earlier run left in it goes out first)."""
        if self.outbox is None:
            self.outbox = Outbox(self.path)
            # A reopened outbox numbers its messages afresh: the states kept count as older
            # than anything in it, so they are published again after its backlog.
            self._retained = {topic: (0, payload) for topic, (_, payload) in self._retained.items()}
            if left := self.outbox.depth():
                log.info("outbox %s holds %d messages from before: delivering them first", self.path, left)
        return self.outbox

    def close(self) -> None:
        """Close the outbox; what the broker has not acknowledged stays for the next start."""
        if self.outbox is not None:
            if left := self.outbox.depth():
                log.warning("%d messages not yet acknowledged stay in %s for the next start", left, self.path)
            self.outbox.close()
            self.outbox = None

    def add(self, topic: str, payload: bytes, retain: bool, supersede: bool = False) -> None:
        """Commit a message (QoS 1) to the outbox; a retained one is its topic's current
        state. ``supersede`` (retained only): the topic's previous state, if it still waits,
        is dropped from the outbox — for a large state whose history matters to no one (a
        snapshot), so a broker outage does not pile them up."""
        assert self.outbox is not None, "MqttSink used before start()"
        previous = self._retained.get(topic)
        message_id = self.outbox.add(topic, payload, qos=1, retain=retain)
        if retain:
            self._retained[topic] = (message_id, payload)
            if supersede and previous is not None and previous[0]:
                self.outbox.ack(previous[0])  # forgotten as if delivered (nothing, when it was)
        self._wakeup.set()

    async def send(self, client: aiomqtt.Client, ctx: Context) -> None:
        """Publish the outbox to ``client`` as it fills, the retained states once the
        backlog of the connect is out; returns once ``closing`` is set."""
        outbox = self.open()
        backlog_end = outbox.newest_id()  # what waited for this connection
        last_sent: dict[str, bytes] = {}  # retained topic -> the payload last published on this connection
        republished = False
        while not self.closing.is_set():
            self._wakeup.clear()
            batch = outbox.pending(self.window)
            if not republished:
                batch = [m for m in batch if m.id <= backlog_end]
                if not batch:
                    # A state whose current value is still queued after the backlog goes out from
                    # the outbox in its turn: published here too, it would arrive twice.
                    stale = {t: p for t, (i, p) in self._retained.items() if i <= backlog_end and last_sent.get(t) != p}
                    if not await self._publish(client, ((t, p, True) for t, p in stale.items())):
                        return
                    last_sent.update(stale)
                    republished = True
                    continue
            if not batch:
                await first_of(self._wakeup.wait(), self.closing.wait())
                continue
            if not await self._publish(client, ((m.topic, m.payload, m.retain) for m in batch)):
                return
            for message in batch:
                outbox.ack(message.id)
                if message.retain:
                    last_sent[message.topic] = message.payload
            self.published += len(batch)
            ctx.count("mqtt_published", len(batch))
            ctx.counters["outbox_depth"] = outbox.depth()

    async def _publish(self, client: aiomqtt.Client, messages: Iterable[tuple[str, bytes, bool]]) -> bool:
        """Publish at once and wait for every acknowledgement; False when ``closing`` was
        set first (nothing more is waited for)."""
        publishes = asyncio.gather(*(client.publish(t, p, qos=1, retain=r, timeout=10) for t, p, r in messages))
        closing = asyncio.ensure_future(self.closing.wait())
        waiting: set[asyncio.Future[Any]] = {publishes, closing}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not publishes.done():
                publishes.cancel()
                await asyncio.gather(publishes, return_exceptions=True)
        # A gather cancelled while its publishes waited ends with CancelledError as its
        # *exception* (not cancelled()); one whose last PUBACK came as it was cancelled ends
        # with its result, and its window counts as delivered.
        if publishes.cancelled() or isinstance(publishes.exception(), asyncio.CancelledError):
            return False
        publishes.result()  # raises the connection's failure
        return True

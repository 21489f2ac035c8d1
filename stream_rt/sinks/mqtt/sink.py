"""The MQTT sink: the graph node that turns packets into messages (topics in
:mod:`stream_rt.sinks.mqtt`) and composes the parts that deliver them: the
:class:`~stream_rt.sinks.mqtt.connection.BrokerConnection`, the
:class:`~stream_rt.sinks.mqtt.delivery.Delivery` of the outbox, the
:class:`~stream_rt.sinks.mqtt.commands.CommandListener` and Home Assistant's discovery."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import aiomqtt

from stream_rt.config import MqttSinkConfig
from stream_rt.graph.backoff import Backoff
from stream_rt.graph.node import Context, Sink
from stream_rt.graph.packets import EndOfStream, Event, MllmAnswer, Packet, SourceStatus, Transcript, WatchState
from stream_rt.media.images import encode_jpeg
from stream_rt.sinks.commands import CommandTarget, HistoryTarget
from stream_rt.sinks.mqtt.commands import CommandListener
from stream_rt.sinks.mqtt.connection import BrokerConnection
from stream_rt.sinks.mqtt.delivery import Delivery
from stream_rt.sinks.mqtt.history import HistoryAsks
from stream_rt.sinks.mqtt.home_assistant import discovery_messages, watch_discovery
from stream_rt.sinks.mqtt.messages import Topics, encode, status_record
from stream_rt.sinks.outbox import Outbox

log = logging.getLogger("stream_rt.mqtt")

FEATURE_OF: dict[type[Packet], str] = {Event: "events", MllmAnswer: "answers", Transcript: "transcript"}
"""The topic feature (``<prefix>/<source>/<feature>``) of each kind of record published as it comes."""

GOODBYE_S = 1.0
"""How long a stopping sink waits for the broker to acknowledge its goodbye."""


class MqttSink(Sink):
    """Publishes events, answers, watch transitions and each source's status to the
    broker of ``config`` (its ``[sinks.mqtt]`` section), through a durable outbox.

    ``sources`` are the graph's sources (their status is published ``offline`` when their
    stream ends or the sink stops); ``commands``, when given, receives the commands of
    ``<prefix>/<source>/<feature>/set``; ``history``, when given, answers the questions of
    ``<prefix>/history/ask/set`` (refused without it); ``stats`` (``Graph.statistics``) is published on
    ``<prefix>/stats`` every ``stats_interval_s``. ``drain_timeout_s`` bounds the wait for
    the outbox to empty at the stop; ``backoff`` paces reconnects; ``publish_window``
    messages are in flight at once. For Home Assistant's discovery: ``asks`` whether a
    model answers the ``ask`` command (a text entity to ask), ``watches`` each source's
    standing watch id at the start (later ones are announced as they are set)."""

    inputs = {"in": (Event, MllmAnswer, SourceStatus, Transcript, WatchState)}

    def __init__(
        self,
        name: str,
        config: MqttSinkConfig,
        drain_timeout_s: float = 5.0,
        stats: Callable[[], dict[str, Any]] | None = None,
        commands: CommandTarget | None = None,
        sources: set[str] | None = None,
        backoff: Backoff | None = None,
        publish_window: int = 64,
        asks: bool = False,
        watches: dict[str, str] | None = None,
        history: HistoryTarget | None = None,
    ) -> None:
        super().__init__(name)
        self.config = config
        self.asks = asks
        self.watches = dict(watches or {})  # source -> its standing watch's id (announced to Home Assistant)
        self.stats = stats
        self.sources = sources or set()
        self.drain_timeout_s = drain_timeout_s
        self.topics = Topics(config.prefix)
        will = aiomqtt.Will(self.topics("available"), b"offline", qos=1, retain=True)
        self.connection = BrokerConnection(config, will, backoff or Backoff(), publish_window)
        self.delivery = Delivery(config.outbox, publish_window, self.connection.closing)
        self.commands = CommandListener(commands, self.sources, self.topics) if commands is not None else None
        self.history_asks = HistoryAsks(history, self.topics, lambda t, p: self.delivery.add(t, p, retain=False))
        self._ended: dict[str, str] = {}  # sources whose stream ended, with why
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.connection.connected

    @property
    def published(self) -> int:
        """Messages of the outbox the broker has acknowledged."""
        return self.delivery.published

    @property
    def _outbox(self) -> Outbox | None:
        return self.delivery.outbox

    def health(self, now_ns: int, grace_ns: int) -> str | None:
        """``None`` while the broker is reachable (or lost for less than ``grace_ns``); else
        one line saying for how long it has not been."""
        problem = self.connection.health(now_ns, grace_ns)
        return f"{self.name} ({problem})" if problem else None

    async def start(self, ctx: Context) -> None:
        self.delivery.open()
        if self._task is None:
            self.connection.closing.clear()
            run = self.connection.run(lambda client: self._session(client, ctx), ctx)
            self._task = asyncio.create_task(run, name=f"stream_rt:{self.name}:mqtt")

    async def process(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, WatchState):  # transitions only, retained: the watch's state now
            self._announce_watch(packet)
            self.delivery.add(self.topics(packet.source_id, "watch", packet.watch_id), encode(packet.to_record()), True)
        elif isinstance(packet, Event | MllmAnswer | Transcript):
            feature = FEATURE_OF[type(packet)]
            record = encode(packet.to_record())
            self.delivery.add(self.topics(packet.source_id, feature), record, retain=False)
            if isinstance(packet, Event) and packet.type in ("new", "end"):
                self._state(packet.source_id, "activity", "ON" if packet.type == "new" else "OFF")
            if isinstance(packet, MllmAnswer) and packet.status != "dropped":  # dropped: never asked, no answer
                self.delivery.add(self.topics(packet.source_id, "last_answer"), record, retain=True)
            if isinstance(packet, Event) and packet.type != "end" and self.config.snapshots:
                await self._snapshot(packet)
            outbox = self._outbox
            assert outbox is not None
            ctx.counters["outbox_depth"] = outbox.depth()
            for name in ("write_errors", "recreated", "dropped"):
                if value := getattr(outbox, name):
                    ctx.counters[f"outbox_{name}"] = value

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, SourceStatus):
            self._status(packet.source_id, packet.state, packet.detail, packet.wall_ns, packet.streams)
        elif isinstance(packet, EndOfStream) and packet.source_id in self.sources - self._ended.keys():
            # A source's stream ended (end of file, or the daemon stopping): it is offline now.
            detail = self._ended[packet.source_id] = "end of stream" if packet.reason == "eof" else "stream stopped"
            self._status(packet.source_id, "offline", detail, ctx.clock.wall_ns())

    async def _snapshot(self, event: Event) -> None:
        """The event's frame, retained: the source's last snapshot (a waiting older one is dropped)."""
        if event.snapshot_jpeg:
            jpeg = event.snapshot_jpeg
        elif event.frame is not None:
            jpeg = await asyncio.to_thread(encode_jpeg, event.frame)
        else:
            return
        self.delivery.add(self.topics(event.source_id, "snapshot"), jpeg, retain=True, supersede=True)

    def _announce_watch(self, change: WatchState) -> None:
        """Home Assistant's sensor of a watch: announced when the watch is set, removed with it."""
        source, watch_id = change.source_id, change.watch_id
        if not self.config.home_assistant:
            return
        if change.state == "removed" and self.watches.get(source) == watch_id:
            del self.watches[source]
            topic, _ = watch_discovery(self.config.prefix, source, watch_id, self.config.discovery_prefix)
            self.delivery.add(topic, b"", retain=True)  # an empty config removes the entity
        elif change.state in ("unmet", "met") and self.watches.get(source) != watch_id:
            self.watches[source] = watch_id
            topic, payload = watch_discovery(self.config.prefix, source, watch_id, self.config.discovery_prefix)
            self.delivery.add(topic, encode(payload), retain=True)

    def _status(self, source: str, state: str, detail: str, wall_ns: int, streams: tuple[str, ...] = ()) -> None:
        self.delivery.add(self.topics(source, "status"), encode(status_record(state, detail, wall_ns, streams)), True)
        self._state(source, "available", state)

    def _state(self, source: str, feature: str, text: str) -> None:
        """A retained state in plain text (``ON``, ``online``...), as Home Assistant reads it."""
        self.delivery.add(self.topics(source, feature), text.encode(), retain=True)

    async def stop(self, ctx: Context) -> None:
        """Give the outbox up to ``drain_timeout_s`` (less the goodbye's time) to empty,
        then say goodbye — ``available`` ``offline`` and each source's status ``offline``,
        retained, published at once, ahead of anything still queued — and disconnect
        cleanly; whatever is left stays in the outbox for the next start. The goodbye goes
        out ahead of the DISCONNECT, so a broker that never gets it publishes the Last Will;
        it is tried even when the graph cancels the wait."""
        outbox = self._outbox
        assert outbox is not None
        await self.history_asks.stop()
        for source in self.sources - self._ended.keys():  # not ended by their stream: stopped with us
            self._ended[source] = "stream stopped"
        loop = asyncio.get_running_loop()
        goodbye_s = min(GOODBYE_S + 0.5, self.drain_timeout_s / 3)  # kept for the goodbye, out of the drain time
        deadline = loop.time() + self.drain_timeout_s - goodbye_s
        cancelled = False
        try:
            while outbox.depth() and loop.time() < deadline:
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            cancelled = True
        if self._task is not None:
            self.connection.close()
            if self.connected:  # the goodbye needs the broker's acknowledgement
                try:
                    await asyncio.wait({self._task}, timeout=goodbye_s)
                except asyncio.CancelledError:
                    cancelled = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.delivery.close()
        if cancelled:
            raise asyncio.CancelledError

    async def _session(self, client: aiomqtt.Client, ctx: Context) -> None:
        """While connected: ``available`` ``online``, the announcements, then the outbox,
        commands and stats until the sink stops, then the goodbye."""
        await client.publish(self.topics("available"), b"online", qos=1, retain=True)
        if self.commands is not None:
            await self.commands.subscribe(client)  # <prefix>/+/+/set: the history's questions too
        else:
            await client.subscribe(self.history_asks.topic, qos=1)
        if self.config.home_assistant:
            config = self.config
            for topic, payload in discovery_messages(config.prefix, sorted(self.sources), config.discovery_prefix,
                                                     snapshots=config.snapshots, asks=self.asks,
                                                     watches=self.watches):  # fmt: skip
                await client.publish(topic, encode(payload), qos=1, retain=True)
        parts = [self.delivery.send(client, ctx), self._listen(client, ctx)]
        if self.stats is not None:
            parts.append(self._publish_stats(client, ctx))
        try:
            await _until_first_returns(*parts)
        except asyncio.CancelledError:
            if self.connection.closing.is_set():  # stopped before the goodbye: still ahead of the DISCONNECT
                goodbye = [asyncio.ensure_future(client.publish(t, p, qos=1, retain=True))
                           for t, p in self._offline(ctx)]  # fmt: skip
                await asyncio.sleep(0)  # each has handed its message to the client: queued
                for publish in goodbye:
                    publish.cancel()
            raise
        await self._goodbye(client, ctx)

    async def _listen(self, client: aiomqtt.Client, ctx: Context) -> None:
        """Commands as they arrive; raises :class:`aiomqtt.MqttError` as soon as the
        connection is lost (even with no commands to hear), which ends the session."""
        async for message in client.messages:
            if str(message.topic) == self.history_asks.topic:
                payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
                self.history_asks.handle(payload, ctx)
            elif self.commands is not None:
                await self.commands.handle(client, message, ctx)

    async def _publish_stats(self, client: aiomqtt.Client, ctx: Context) -> None:
        assert self.stats is not None
        while True:
            payload = json.dumps({"wall_ns": ctx.clock.wall_ns(), **self.stats()}, separators=(",", ":"))
            await client.publish(self.topics("stats"), payload.encode(), qos=0)
            await ctx.clock.sleep(self.config.stats_interval_s)

    async def _goodbye(self, client: aiomqtt.Client, ctx: Context) -> None:
        """``available`` ``offline`` and each source ``offline``, retained, straight to the
        broker (a backlog in the outbox must not keep a stopped daemon looking up). They
        go out ahead of the DISCONNECT that follows, so a broker that has not
        acknowledged them within ``GOODBYE_S`` (a slow link) still gets them first, and
        one that never gets them publishes the Last Will (``available`` ``offline``)."""
        publishing = asyncio.gather(*(client.publish(t, p, qos=1, retain=True) for t, p in self._offline(ctx)))
        try:
            await asyncio.wait_for(publishing, GOODBYE_S)
        except TimeoutError:
            log.warning("the MQTT broker did not acknowledge the goodbye within %g s: disconnecting", GOODBYE_S)

    def _offline(self, ctx: Context) -> list[tuple[str, bytes]]:
        """The goodbye: ``available`` and each source's status and availability ``offline``."""
        wall_ns = ctx.clock.wall_ns()
        offline = [(self.topics("available"), b"offline")]
        for source, detail in self._ended.items():
            offline.append((self.topics(source, "status"), encode(status_record("offline", detail, wall_ns))))
            offline.append((self.topics(source, "available"), b"offline"))
        return offline


async def _until_first_returns(*parts: Coroutine[Any, Any, None]) -> None:
    """Run ``parts`` together until the first returns or raises; the others are cancelled
    (and awaited), and the first's exception is raised."""
    tasks = [asyncio.ensure_future(part) for part in parts]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()

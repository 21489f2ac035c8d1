"""Publish events, answers and source status to an MQTT broker through a durable outbox.

Topics, under a configurable prefix (default ``stream_rt``), in the conventions Frigate
users know:

- ``<prefix>/available``: ``online`` (retained) on every (re)connect; ``offline``
  (retained) when the sink stops cleanly, before it disconnects; the broker publishes
  ``offline`` (the Last Will, retained) if the connection is lost;
- ``<prefix>/<source>/events``: one JSON object per event (``type`` new|update|end|ask|check,
  ``event_id``, media and wall times, ``score`` and ``components``, ``regions``), QoS 1;
- ``<prefix>/<source>/answers``: the model's answers (:class:`MllmAnswer`), keyed by the
  ``event_id`` of the event they answer, QoS 1;
- ``<prefix>/<source>/status``: ``{"state": "online"|"offline", "detail": ...}``,
  retained, QoS 1; a source whose stream ends (end of file, the daemon stopping) is
  published ``offline`` then, so a dashboard never shows a stopped daemon's cameras up;
- ``<prefix>/<source>/available``: ``online`` | ``offline``, retained, as its status;
- ``<prefix>/<source>/activity``: ``ON`` when an episode opens, ``OFF`` when it ends,
  retained;
- ``<prefix>/<source>/enabled/state``: ``ON`` | ``OFF``, retained, on connect and after
  each ``enabled`` command;
- ``<prefix>/<source>/watch/<id>``: a standing watch's transitions (``state`` unmet, met,
  expired or removed, ``since_ns``, ``event_id``, ``summary``), retained, QoS 1;
- ``<prefix>/stats``: the graph's counters (``Graph.statistics()``) every
  ``stats_interval_s``, QoS 0, not kept in the outbox (only the latest matters).

With ``home_assistant`` the sink also publishes Home Assistant's MQTT discovery messages
on every connect (:mod:`stream_rt.sinks.home_assistant`).

Each message is committed to the :class:`~stream_rt.sinks.outbox.Outbox` first and
removed only once the broker has acknowledged it (PUBACK), so an unreachable broker, a
broker restart or a crash of this process loses nothing; the connection is retried with
backoff for as long as the sink runs, and starting while the broker is down is fine.
:meth:`MqttSink.health` reports a broker unreachable for longer than a grace time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from stream_rt.graph.backoff import Backoff
from stream_rt.graph.node import Context, Sink, describe_error
from stream_rt.graph.packets import EndOfStream, Event, MllmAnswer, Packet, SourceStatus, WatchState
from stream_rt.sinks.commands import CommandError, CommandTarget, apply_command
from stream_rt.sinks.home_assistant import discovery_messages
from stream_rt.sinks.outbox import Outbox

log = logging.getLogger("stream_rt.mqtt")

GOODBYE_S = 1.0
"""How long a stopping sink waits for the broker to acknowledge its goodbye."""

# CONNACK codes for refused credentials: MQTT 3.1.1 (4, 5) and MQTT 5 (134, 135).
_REFUSED_CREDENTIALS = {4, 5, 134, 135}


@dataclass(frozen=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "stream_rt"
    client_id: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    outbox: Path = Path("stream_rt-outbox.sqlite")
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    publish_window: int = 64
    stats_interval_s: float = 30.0
    backoff: Backoff = field(default_factory=lambda: Backoff(0.5, 10.0, 0.2))
    home_assistant: bool = False
    discovery_prefix: str = "homeassistant"


class MqttSink(Sink):
    """Publishes events, answers, source status and watch transitions reaching ``in`` to an
    MQTT broker under ``prefix``, through a durable outbox (nothing the outbox took is lost
    to a broker outage or a restart); retained availability and status; optional command
    topics and Home Assistant discovery (topics and payloads: the module docstring and
    docs/MQTT.md)."""

    inputs = {"in": (Event, MllmAnswer, SourceStatus, WatchState)}

    def __init__(
        self,
        name: str,
        settings: MqttSettings,
        drain_timeout_s: float = 5.0,
        stats: Callable[[], dict[str, Any]] | None = None,
        commands: CommandTarget | None = None,
        sources: set[str] | None = None,
    ) -> None:
        super().__init__(name)
        self.settings = settings
        self.stats = stats
        self.commands = commands
        self.sources = sources or set()
        self.drain_timeout_s = drain_timeout_s
        self.connected = False
        self.published = 0
        self.down_since_ns: int | None = None  # when the broker was last lost (or the sink started), on the graph clock
        self._ended: dict[str, str] = {}  # sources whose stream ended, with why
        self._closing = asyncio.Event()  # stop(): say goodbye, then disconnect
        self._outbox: Outbox | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()

    def topic(self, *parts: str) -> str:
        return "/".join((self.settings.prefix, *parts))

    async def start(self, ctx: Context) -> None:
        if self._outbox is None:
            self._outbox = Outbox(self.settings.outbox)
            left = self._outbox.depth()
            if left:
                log.info("outbox %s holds %d messages from before: delivering them first", self.settings.outbox, left)
        if self._task is None:
            self.down_since_ns = ctx.clock.now_ns()
            self._closing.clear()
            self._task = asyncio.create_task(self._run(ctx), name=f"stream_rt:{self.name}:mqtt")

    async def process(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, WatchState):  # transitions only, retained: the watch's state now
            self._enqueue(self.topic(packet.source_id, "watch", packet.watch_id), packet.to_record(), retain=True)
        elif isinstance(packet, Event | MllmAnswer):
            feature = "events" if isinstance(packet, Event) else "answers"
            self._enqueue(self.topic(packet.source_id, feature), packet.to_record(), retain=False)
            if isinstance(packet, Event) and packet.type in ("new", "end"):
                self._enqueue_text(self.topic(packet.source_id, "activity"), "ON" if packet.type == "new" else "OFF")
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

    def _status(self, source: str, state: str, detail: str, wall_ns: int, streams: tuple[str, ...] = ()) -> None:
        self._enqueue(self.topic(source, "status"), _status_record(state, detail, wall_ns, streams), retain=True)
        self._enqueue_text(self.topic(source, "available"), state)

    async def stop(self, ctx: Context) -> None:
        """Give the outbox up to ``drain_timeout_s`` (less the goodbye's time) to empty,
        then say goodbye — ``available`` ``offline`` and each source's status ``offline``,
        retained, published at once, ahead of anything still queued — and disconnect
        cleanly; whatever is left stays in the outbox for the next start. A goodbye that
        cannot be acknowledged in time drops the connection instead, so that the broker
        publishes the Last Will; it is tried even when the graph cancels the wait."""
        assert self._outbox is not None
        for source in self.sources - self._ended.keys():  # not ended by their stream: stopped with us
            self._ended[source] = "stream stopped"
        loop = asyncio.get_running_loop()
        goodbye_s = min(GOODBYE_S + 0.5, self.drain_timeout_s / 3)  # kept for the goodbye, out of the drain time
        deadline = loop.time() + self.drain_timeout_s - goodbye_s
        cancelled = False
        try:
            while self._outbox.depth() and loop.time() < deadline:
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            cancelled = True
        if self._task is not None:
            self._closing.set()
            self._wakeup.set()
            if self.connected:  # the goodbye needs the broker's acknowledgement
                try:
                    await asyncio.wait({self._task}, timeout=goodbye_s)
                except asyncio.CancelledError:
                    cancelled = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        left = self._outbox.depth()
        if left:
            log.warning("%d messages not yet acknowledged stay in %s for the next start", left, self.settings.outbox)
        self._outbox.close()
        self._outbox = None
        if cancelled:
            raise asyncio.CancelledError

    def _enqueue(self, topic: str, record: dict[str, object], retain: bool) -> None:
        self._enqueue_payload(topic, _encode(record), retain)

    def _enqueue_text(self, topic: str, text: str) -> None:
        """A retained state in plain text (``ON``, ``online``...), as Home Assistant reads it."""
        self._enqueue_payload(topic, text.encode(), retain=True)

    def _enqueue_payload(self, topic: str, payload: bytes, retain: bool) -> None:
        assert self._outbox is not None, "MqttSink used before start()"
        self._outbox.add(topic, payload, qos=1, retain=retain)
        self._wakeup.set()

    async def _announce(self, client: aiomqtt.Client) -> None:
        """On connect: each source's enabled state, and Home Assistant's discovery messages."""
        if self.commands is not None:
            for source in sorted(self.sources):
                await self._publish_enabled(client, source)
        if self.settings.home_assistant:
            for topic, payload in discovery_messages(self.settings.prefix, sorted(self.sources),
                                                     self.settings.discovery_prefix):  # fmt: skip
                await client.publish(topic, _encode(payload), qos=1, retain=True)

    async def _run(self, ctx: Context) -> None:
        s = self.settings
        failures = 0
        will = aiomqtt.Will(self.topic("available"), b"offline", qos=1, retain=True)
        tls = None
        if s.tls_ca is not None:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(s.tls_ca),
                certfile=str(s.tls_cert) if s.tls_cert else None,
                keyfile=str(s.tls_key) if s.tls_key else None,
            )
        while True:
            client = aiomqtt.Client(
                s.host, s.port, identifier=s.client_id, username=s.username, password=s.password,
                will=will, timeout=10, tls_params=tls,
            )  # fmt: skip
            client.pending_calls_threshold = 2 * s.publish_window  # a full window is expected
            try:
                async with client:
                    await client.publish(self.topic("available"), b"online", qos=1, retain=True)
                    await self._announce(client)
                    self.connected = True
                    failures = 0
                    log.info("connected to MQTT broker %s:%d", s.host, s.port)
                    helpers = []
                    if self.stats is not None:
                        helpers.append(asyncio.create_task(self._publish_stats(client, ctx)))
                    if self.commands is not None:
                        await client.subscribe(self.topic("+", "+", "set"), qos=1)
                        helpers.append(asyncio.create_task(self._listen(client, ctx)))
                    try:
                        await self._drain(client, ctx)
                    except asyncio.CancelledError:
                        if self._closing.is_set():  # stopped before the goodbye was out: let the Will say it
                            _drop_connection(client)
                        raise
                    finally:
                        for helper in helpers:
                            helper.cancel()
                        await asyncio.gather(*helpers, return_exceptions=True)
                log.info("disconnected from MQTT broker %s:%d", s.host, s.port)
                return  # _drain returns only once the goodbye is out
            except aiomqtt.MqttError as exc:
                if self._closing.is_set():
                    return  # stopping: no reconnect (a goodbye that failed left the Last Will to the broker)
                self._report(exc, failures, ctx)
                self._lost(ctx)
                ctx.count("mqtt_reconnects")
                await ctx.clock.sleep(s.backoff.delay(failures, self._rng))
                failures += 1
            finally:
                self._lost(ctx)
                _consume_disconnect(client)

    async def _goodbye(self, client: aiomqtt.Client, ctx: Context) -> None:
        """``available`` ``offline`` and each source ``offline``, retained, straight to the
        broker (a backlog in the outbox must not keep a stopped daemon looking up). When the
        broker does not acknowledge them within ``GOODBYE_S`` (a slow link), the connection
        is dropped without a DISCONNECT, so that the broker publishes the Last Will
        (``available`` ``offline``) instead."""
        wall_ns = ctx.clock.wall_ns()
        publishing = [
            client.publish(self.topic("available"), b"offline", qos=1, retain=True),
            *(
                client.publish(self.topic(source, "status"), _encode(_status_record("offline", detail, wall_ns)),
                               qos=1, retain=True)
                for source, detail in self._ended.items()
            ),
            *(client.publish(self.topic(s, "available"), b"offline", qos=1, retain=True) for s in self._ended),
        ]  # fmt: skip
        try:
            await asyncio.wait_for(_unless_disconnected(client, *publishing), GOODBYE_S)
        except (TimeoutError, aiomqtt.MqttError):
            log.warning(
                "the MQTT broker did not acknowledge the goodbye within %g s: dropping the connection so that it "
                "publishes the Last Will ('available' offline)", GOODBYE_S,
            )  # fmt: skip
            _drop_connection(client)

    def _lost(self, ctx: Context) -> None:
        if self.connected:
            self.connected = False
            self.down_since_ns = ctx.clock.now_ns()

    def health(self, now_ns: int, grace_ns: int) -> str | None:
        """``None`` while the broker is reachable (or lost for less than ``grace_ns``); else
        one line saying for how long it has not been."""
        if self.connected or self.down_since_ns is None or now_ns - self.down_since_ns < grace_ns:
            return None
        s, down_s = self.settings, (now_ns - self.down_since_ns) / 1e9
        return f"{self.name} (MQTT broker {s.host}:{s.port} unreachable for {down_s:.0f} s)"

    def _report(self, exc: aiomqtt.MqttError, failures: int, ctx: Context) -> None:
        """One clear line per outage (not per retry); refused credentials are an error."""
        s = self.settings
        code = getattr(exc, "rc", None)
        if isinstance(exc, aiomqtt.MqttCodeError) and getattr(code, "value", code) in _REFUSED_CREDENTIALS:
            ctx.count("mqtt_auth_refused")
            if failures == 0:
                who = f"user '{s.username}'" if s.username else "anonymous clients"
                log.error(
                    "the MQTT broker %s:%d refused %s (%s): check the username and password "
                    "([sinks.mqtt] or STREAM_RT_MQTT_USERNAME / STREAM_RT_MQTT_PASSWORD); retrying",
                    s.host, s.port, who, exc,
                )  # fmt: skip
        elif self.connected:
            log.warning("lost the MQTT broker %s:%d: %s", s.host, s.port, exc)
        elif failures == 0:
            log.warning("cannot reach the MQTT broker %s:%d: %s (retrying)", s.host, s.port, exc)

    async def _listen(self, client: aiomqtt.Client, ctx: Context) -> None:
        """Apply validated commands; answer each on the source's status topic."""
        assert self.commands is not None
        async for message in client.messages:
            parts = str(message.topic).split("/")
            source, feature = parts[-3], parts[-2]
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            try:
                done = apply_command(self.commands, self.sources, source, feature, payload)
                reply: dict[str, object] = {"command": feature, "ok": True, **done}
                log.info("command for '%s': %s", source, done["applied"])
                ctx.count("commands_applied")
                if feature == "enabled":
                    await self._publish_enabled(client, source)
            except CommandError as exc:
                reply = {"command": feature, "ok": False, "error": str(exc)}
                log.warning("rejected a command on %s: %s", message.topic, exc)
                ctx.count("commands_rejected")
            except Exception as exc:  # a fault applying it: said, counted, and the next command still heard
                reply = {"command": feature, "ok": False, "error": f"failed: {describe_error(exc)}"}
                log.error("a command on %s failed: %s", message.topic, describe_error(exc))
                ctx.count("commands_failed")
            topic = self.topic(source, "status") if source in self.sources else self.topic("status")
            await client.publish(topic, json.dumps(reply).encode(), qos=1)

    async def _publish_enabled(self, client: aiomqtt.Client, source: str) -> None:
        """``<source>/enabled/state``, retained: what the trigger holds now."""
        assert self.commands is not None
        state = b"ON" if self.commands.is_enabled(source) else b"OFF"
        await client.publish(self.topic(source, "enabled", "state"), state, qos=1, retain=True)

    async def _publish_stats(self, client: aiomqtt.Client, ctx: Context) -> None:
        assert self.stats is not None
        while True:
            payload = json.dumps({"wall_ns": ctx.clock.wall_ns(), **self.stats()}, separators=(",", ":"))
            await client.publish(self.topic("stats"), payload.encode(), qos=0)
            await ctx.clock.sleep(self.settings.stats_interval_s)

    async def _drain(self, client: aiomqtt.Client, ctx: Context) -> None:
        assert self._outbox is not None
        outbox = self._outbox
        while True:
            self._wakeup.clear()
            if self._closing.is_set():
                await self._goodbye(client, ctx)
                return
            batch = outbox.pending(self.settings.publish_window)
            if not batch:
                await self._wakeup.wait()
                continue
            # Publish a window at once (the broker acknowledges in order), then forget
            # each message only after its acknowledgement arrived; stopping does not wait
            # for a window (it stays in the outbox).
            publishing = (client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain, timeout=10) for m in batch)
            if not await _unless_disconnected(client, *publishing, give_up=self._closing):
                continue
            for message in batch:
                outbox.ack(message.id)
            self.published += len(batch)
            ctx.count("mqtt_published", len(batch))
            ctx.counters["outbox_depth"] = outbox.depth()


async def _unless_disconnected(
    client: aiomqtt.Client, *publishing: Coroutine[Any, Any, None], give_up: asyncio.Event | None = None
) -> bool:
    """Wait for the ``publishing`` calls, but not after the connection died (raises
    MqttError): aiomqtt lets a publish wait for its acknowledgement until its own timeout
    even after the broker went away, which would stall the outbox for that long before
    reconnecting. False when ``give_up`` was set first (nothing more is waited for)."""
    publishes = asyncio.gather(*publishing)
    publishes.add_done_callback(_retrieve)  # however this ends (cancelled too), nothing is left unread
    waiting: set[asyncio.Future[Any]] = {publishes}
    disconnected = _disconnect_future(client)
    if disconnected is not None:
        waiting.add(disconnected)
    giving_up = asyncio.ensure_future(give_up.wait()) if give_up is not None else None
    if giving_up is not None:
        waiting.add(giving_up)
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if giving_up is not None:
            giving_up.cancel()
        if not publishes.done():
            publishes.cancel()
    if publishes.done() and not publishes.cancelled():
        publishes.result()
        return True
    if give_up is not None and give_up.is_set():
        return False
    raise aiomqtt.MqttError("the connection to the broker was lost")


def _drop_connection(client: aiomqtt.Client) -> None:
    """Cut the connection without a DISCONNECT (the broker then publishes the Will)."""
    sock = client._client.socket()  # paho's socket: aiomqtt has no public way to do this
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _status_record(state: str, detail: str, wall_ns: int, streams: tuple[str, ...] = ()) -> dict[str, object]:
    return {"state": state, "detail": detail, "streams": list(streams), "wall_ns": wall_ns}


def _encode(record: dict[str, object]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _consume_disconnect(client: aiomqtt.Client) -> None:
    """aiomqtt keeps the reason of an unexpected disconnect in a future that nobody reads
    when the connection dies inside ``async with``; read it (we already handled the error
    above) so asyncio does not print 'Future exception was never retrieved' at exit."""
    future = _disconnect_future(client)
    if future is not None and future.done() and not future.cancelled():
        future.exception()


def _disconnect_future(client: aiomqtt.Client) -> asyncio.Future[Any] | None:
    """aiomqtt's (private) future that completes when the connection ends, if it has one."""
    future = getattr(client, "_disconnected", None)
    return future if isinstance(future, asyncio.Future) else None

"""The connection to the MQTT broker: connect, run a session while connected, and on
failure say what went wrong once, back off and connect again, for as long as it is not
closed.

Starting while the broker is down is fine. A session ends with an :class:`aiomqtt.MqttError`
when the connection is lost (aiomqtt's message iterator raises it, so a session that
iterates ``client.messages`` notices at once, even idle); it returns to end the
connection cleanly (a DISCONNECT, after whatever it published). Only a refused CONNACK
(bad username or password, not authorised) is reported as a credentials problem; a
connection refused or lost at the network level means the broker cannot be reached.

Credentials come from the config or, better, the environment
(``STREAM_RT_MQTT_USERNAME`` / ``STREAM_RT_MQTT_PASSWORD``); never from code, never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable

import aiomqtt

from stream_rt.config import MqttSinkConfig
from stream_rt.graph.backoff import Backoff, Retry
from stream_rt.graph.node import Context

log = logging.getLogger("stream_rt.mqtt")

# CONNACK codes for refused credentials: MQTT 3.1.1 (4, 5) and MQTT 5 (134, 135).
REFUSED_CREDENTIALS = frozenset({4, 5, 134, 135})

Session = Callable[[aiomqtt.Client], Awaitable[None]]


class BrokerConnection:
    """Keeps one connection to the broker of ``config`` up and runs a session on it.

    ``will`` is the Last Will the broker publishes when the connection is lost without a
    DISCONNECT; ``window`` the publishes a session keeps in flight at once (aiomqtt warns
    only beyond twice that). ``connected`` and ``down_since_ns`` (graph clock) say how
    it stands; :meth:`health` turns them into one line for ``/healthz``."""

    def __init__(self, config: MqttSinkConfig, will: aiomqtt.Will, backoff: Backoff, window: int) -> None:
        self.config = config
        self.will = will
        self.backoff = backoff
        self.window = window
        self.connected = False
        self.down_since_ns: int | None = None
        self.closing = asyncio.Event()  # set by close(): no reconnect from then on
        self._username = config.username or os.environ.get("STREAM_RT_MQTT_USERNAME")
        self._password = config.password or os.environ.get("STREAM_RT_MQTT_PASSWORD")
        self._rng = random.Random()

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def close(self) -> None:
        """No reconnect after the current session (which sees ``closing`` set)."""
        self.closing.set()

    async def run(self, session: Session, ctx: Context) -> None:
        """Connect and run ``session(client)``; reconnect with backoff whenever the
        connection fails. Returns once a session returned (after a clean disconnect), or
        a failure once closing."""
        self.down_since_ns = ctx.clock.now_ns()
        retry = Retry(self.backoff, ctx.clock, self._rng)
        while True:
            client = self._client()
            try:
                async with client:
                    self.connected = True
                    retry.succeeded()
                    log.info("connected to MQTT broker %s", self.address)
                    await session(client)
                log.info("disconnected from MQTT broker %s", self.address)
                return
            except aiomqtt.MqttError as exc:
                if self.closing.is_set():
                    return  # stopping: no reconnect (the broker publishes the Last Will if it must)
                self._report(exc, retry.failures, ctx)
                self._lost(ctx)
                ctx.count("mqtt_reconnects")
                await retry.pause()
            finally:
                self._lost(ctx)

    def health(self, now_ns: int, grace_ns: int) -> str | None:
        """``None`` while the broker is reachable (or lost for less than ``grace_ns``); else
        how long it has not been."""
        if self.connected or self.down_since_ns is None or now_ns - self.down_since_ns < grace_ns:
            return None
        return f"MQTT broker {self.address} unreachable for {(now_ns - self.down_since_ns) / 1e9:.0f} s"

    def _client(self) -> aiomqtt.Client:
        c = self.config
        tls = None
        if c.tls_ca is not None:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(c.tls_ca),
                certfile=str(c.tls_cert) if c.tls_cert else None,
                keyfile=str(c.tls_key) if c.tls_key else None,
            )
        client = aiomqtt.Client(
            c.host, c.port, identifier=c.client_id, username=self._username, password=self._password,
            will=self.will, timeout=10, tls_params=tls,
        )  # fmt: skip
        client.pending_calls_threshold = 2 * self.window  # a full window in flight is expected
        return client

    def _lost(self, ctx: Context) -> None:
        if self.connected:
            self.connected = False
            self.down_since_ns = ctx.clock.now_ns()

    def _report(self, exc: aiomqtt.MqttError, failures: int, ctx: Context) -> None:
        """One clear line per outage (not per retry); refused credentials are an error.
        While connecting, an :class:`aiomqtt.MqttCodeError` is the broker's CONNACK; once
        connected, its code is paho's (``MQTT_ERR_NO_CONN`` is 4 too, but not a refusal)."""
        code = getattr(exc, "rc", None)
        connack = not self.connected and isinstance(exc, aiomqtt.MqttCodeError)
        if connack and getattr(code, "value", code) in REFUSED_CREDENTIALS:
            ctx.count("mqtt_auth_refused")
            if failures == 0:
                who = f"user '{self._username}'" if self._username else "anonymous clients"
                log.error(
                    "the MQTT broker %s refused %s (%s): check the username and password "
                    "([sinks.mqtt] or STREAM_RT_MQTT_USERNAME / STREAM_RT_MQTT_PASSWORD); retrying",
                    self.address, who, exc,
                )  # fmt: skip
        elif self.connected:
            log.warning("lost the MQTT broker %s: %s (reconnecting)", self.address, exc)
        elif failures == 0:
            log.warning("cannot reach the MQTT broker %s: %s (retrying)", self.address, exc)

"""Commands over MQTT: ``<prefix>/<source>/<feature>/set``, validated by
:func:`stream_rt.sinks.commands.apply_command`, each answered on the source's ``status``
topic (``{"command", "ok", "applied" | "error"}``, not retained); the ``enabled`` switch's
state is kept on ``<source>/enabled/state`` (retained): on every connect, and after each
``enabled`` command."""

from __future__ import annotations

import json
import logging

import aiomqtt

from stream_rt.graph.node import Context, describe_error
from stream_rt.sinks.commands import CommandError, CommandTarget, apply_command
from stream_rt.sinks.mqtt.messages import Topics

log = logging.getLogger("stream_rt.mqtt")


class CommandListener:
    """Applies the commands for ``sources`` to ``target``."""

    def __init__(self, target: CommandTarget, sources: set[str], topics: Topics) -> None:
        self.target = target
        self.sources = sources
        self.topics = topics

    async def subscribe(self, client: aiomqtt.Client) -> None:
        """On connect: each source's enabled state, and the command topics."""
        for source in sorted(self.sources):
            await self._publish_enabled(client, source)
        await client.subscribe(self.topics("+", "+", "set"), qos=1)

    async def handle(self, client: aiomqtt.Client, message: aiomqtt.Message, ctx: Context) -> None:
        """Apply one command; a rejected or failing one changes nothing, is said, counted,
        and the next command is still heard."""
        parts = str(message.topic).split("/")  # <prefix>/<source>/<feature>/set
        source, feature = parts[-3], parts[-2]
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        try:
            done = apply_command(self.target, self.sources, source, feature, payload)
            reply: dict[str, object] = {"command": feature, "ok": True, **done}
            log.info("command for '%s': %s", source, done["applied"])
            ctx.count("commands_applied")
            if feature == "enabled":
                await self._publish_enabled(client, source)
        except CommandError as exc:
            reply = {"command": feature, "ok": False, "error": str(exc)}
            log.warning("rejected a command on %s: %s", message.topic, exc)
            ctx.count("commands_rejected")
        except aiomqtt.MqttError:
            raise  # the connection's failure, not the command's
        except Exception as exc:
            reply = {"command": feature, "ok": False, "error": f"failed: {describe_error(exc)}"}
            log.error("a command on %s failed: %s", message.topic, describe_error(exc))
            ctx.count("commands_failed")
        topic = self.topics(source, "status") if source in self.sources else self.topics("status")
        await client.publish(topic, json.dumps(reply).encode(), qos=1)

    async def _publish_enabled(self, client: aiomqtt.Client, source: str) -> None:
        """``<source>/enabled/state``, retained: what the target holds now."""
        state = b"ON" if self.target.is_enabled(source) else b"OFF"
        await client.publish(self.topics(source, "enabled", "state"), state, qos=1, retain=True)

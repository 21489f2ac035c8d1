"""``/healthz`` and ``/metrics`` over plain HTTP, bound to loopback by default.

- ``/healthz``: 200 ``ok`` while everything works; 503 with one line naming what does not:
  a source offline (counted from the outage; a source that never connected, from the
  start) for longer than ``offline_grace_s``, the MLLM stage when its calls keep failing
  or the model is stuck in a call, the MQTT sink when the broker has been unreachable
  for longer than the grace time. Anything with a ``health(now_ns, grace_ns)`` method
  (returning ``None`` or a one-line problem) can be checked.
- ``/metrics``: Prometheus text format: every counter of every node
  (``stream_rt_node_total{node,counter}``; a counter a node keeps per source, such as the
  trigger's events or change detection's light adjustments, once per source with a
  ``source`` label), each channel's depth and drops by reason, each source's state
  (``stream_rt_source_online``) and every node's gauges (``stream_rt_node_gauge{node,gauge}``,
  e.g. a source's ``fps`` over the last 5 s; per source with ``source``).

A tiny asyncio server: the runtime needs two read-only endpoints, not a web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from stream_rt.graph.clock import Clock
from stream_rt.sources.status import StatusSource

log = logging.getLogger("stream_rt.ops")


class HealthCheck(Protocol):
    def health(self, now_ns: int, grace_ns: int) -> str | None: ...


class OpsServer:
    def __init__(
        self,
        statistics: Callable[[], dict[str, Any]],
        sources: Sequence[StatusSource],
        clock: Clock,
        host: str = "127.0.0.1",
        port: int = 9108,
        offline_grace_s: float = 30.0,
        checks: Sequence[HealthCheck] = (),
    ) -> None:
        self.statistics = statistics
        self.sources = sources
        self.checks = checks
        self.clock = clock
        self.host, self.port = host, port
        self.offline_grace_ns = int(offline_grace_s * 1e9)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("health and metrics on http://%s:%d/healthz and /metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def health(self) -> tuple[bool, str]:
        now = self.clock.now_ns()
        problems = [p for c in (*self.sources, *self.checks) if (p := c.health(now, self.offline_grace_ns))]
        return (not problems), ("ok" if not problems else "unhealthy: " + "; ".join(problems))

    def metrics(self) -> str:
        stats = self.statistics()
        by_source = stats.get("by_source", {})
        lines = [
            "# TYPE stream_rt_node_total counter",
            *(_node_totals(node, counters, by_source.get(node, {})) for node, counters in stats["nodes"].items()),
            "# TYPE stream_rt_channel_depth gauge",
            *(f'stream_rt_channel_depth{{edge="{edge}"}} {e["depth"]}' for edge, e in stats["edges"].items()),
            "# TYPE stream_rt_channel_dropped_total counter",
            *(
                f'stream_rt_channel_dropped_total{{edge="{edge}",reason="{reason}"}} {n}'
                for edge, e in stats["edges"].items()
                for reason, n in e["dropped"].items()
            ),
            "# TYPE stream_rt_source_online gauge",
            *(f'stream_rt_source_online{{source="{s.name}"}} {int(s.state == "online")}' for s in self.sources),
            "# TYPE stream_rt_node_gauge gauge",
            *(
                f'stream_rt_node_gauge{{node="{node}",{_gauge_labels(name)}}} {value}'
                for node, levels in stats["gauges"].items()
                for name, value in levels.items()
            ),
        ]
        return "\n".join(line for line in lines if line) + "\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else ""
            if path == "/healthz":
                ok, text = self.health()
                status, body, kind = ("200 OK" if ok else "503 Service Unavailable"), text + "\n", "text/plain"
            elif path == "/metrics":
                status, body, kind = "200 OK", self.metrics(), "text/plain; version=0.0.4"
            else:
                status, body, kind = "404 Not Found", "try /healthz or /metrics\n", "text/plain"
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(data)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _node_totals(node: str, counters: dict[str, int], by_source: dict[str, dict[str, int]]) -> str:
    """A node's counters: those it counts per source once per source, the others once."""
    split = {name for counts in by_source.values() for name in counts}
    lines = [f'stream_rt_node_total{{node="{node}",counter="{n}"}} {v}' for n, v in counters.items() if n not in split]
    lines += [
        f'stream_rt_node_total{{node="{node}",counter="{n}",source="{source}"}} {v}'
        for source, counts in by_source.items()
        for n, v in counts.items()
    ]
    return "\n".join(lines)


def _gauge_labels(name: str) -> str:
    gauge, _, source = name.partition("/")
    return f'gauge="{gauge}",source="{source}"' if source else f'gauge="{gauge}"'

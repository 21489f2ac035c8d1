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
  (``stream_rt_source_online``) and every node's levels (``stream_rt_node_level{node,level}``,
  e.g. a source's ``fps`` over the last 5 s; per source with ``source``), and the
  nodes' latency histograms (``stream_rt_model_call_seconds``,
  ``stream_rt_event_answer_seconds``). Every family has HELP and TYPE: ``promtool check
  metrics`` finds nothing to say.

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
        """The Prometheus text exposition: HELP and TYPE for every family, counters ending
        in ``_total``, levels as gauges, latencies as histograms (``promtool check metrics``
        is clean)."""
        stats = self.statistics()
        by_source = stats.get("by_source", {})
        lines = [
            *_family("stream_rt_node_total", "counter", "what a node counted (label counter), by source if it can"),
            *(_node_totals(node, counters, by_source.get(node, {})) for node, counters in stats["nodes"].items()),
            *_family("stream_rt_channel_depth", "gauge", "packets waiting in a channel between two nodes"),
            *(f'stream_rt_channel_depth{{edge="{edge}"}} {e["depth"]}' for edge, e in stats["edges"].items()),
            *_family("stream_rt_channel_dropped_total", "counter", "packets a channel dropped, by reason"),
            *(
                f'stream_rt_channel_dropped_total{{edge="{edge}",reason="{reason}"}} {n}'
                for edge, e in stats["edges"].items()
                for reason, n in e["dropped"].items()
            ),
            *_family("stream_rt_source_online", "gauge", "1 while a source delivers media, else 0"),
            *(f'stream_rt_source_online{{source="{s.name}"}} {int(s.state == "online")}' for s in self.sources),
            *_family("stream_rt_node_level", "gauge", "a level a node reports (label level: fps, in_flight...)"),
            *(
                f'stream_rt_node_level{{node="{node}",{_level_labels(name)}}} {value}'
                for node, levels in stats["gauges"].items()
                for name, value in levels.items()
            ),
        ]
        histograms: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for node, named in stats.get("histograms", {}).items():
            for name, record in named.items():
                histograms.setdefault(name, []).append((node, record))
        for name, series in sorted(histograms.items()):
            family = f"stream_rt_{name}"
            lines += _family(family, "histogram", series[0][1]["help"])
            for node, h in series:
                bounds = [*h["bounds"], float("inf")]
                lines += [f'{family}_bucket{{node="{node}",le="{_bound(b)}"}} {n}'
                          for b, n in zip(bounds, h["cumulative"], strict=True)]  # fmt: skip
                lines += [
                    f'{family}_sum{{node="{node}"}} {h["sum"]:.6f}',
                    f'{family}_count{{node="{node}"}} {h["count"]}',
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


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:g}"


def _level_labels(name: str) -> str:
    level, _, source = name.partition("/")
    return f'level="{level}",source="{source}"' if source else f'level="{level}"'

"""``/healthz`` and ``/metrics`` over HTTP (``aiohttp.web``), bound to loopback by default.

- ``/healthz``: 200 ``ok`` while everything works; 503 with one line naming what does not:
  a source offline (counted from the outage; a source that never connected, from the
  start) for longer than ``offline_grace_s``, the MLLM stage when its calls keep failing
  or the model is stuck in a call, the MQTT sink when the broker has been unreachable
  for longer than the grace time. Anything with a ``health(now_ns, grace_ns)`` method
  (returning ``None`` or a one-line problem) can be checked.
- ``/metrics``: the graph's counters, levels and latency histograms in Prometheus' format
  (the families are listed in :mod:`stream_rt.ops.metrics`), written by
  ``prometheus_client`` from a registry of this server's own.
- anything else: 404 ``try /healthz or /metrics``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.exposition import generate_latest

from stream_rt.graph.clock import Clock
from stream_rt.ops.metrics import GraphCollector, NamedState

log = logging.getLogger("stream_rt.ops")


class HealthCheck(Protocol):
    def health(self, now_ns: int, grace_ns: int) -> str | None: ...


class WatchedSource(NamedState, HealthCheck, Protocol):
    """A source as the endpoints see it: its name, its state and its health."""


class OpsServer:
    """Serves one graph's health and metrics (``start()`` / ``stop()``)."""

    def __init__(
        self,
        statistics: Callable[[], dict[str, Any]],
        sources: Sequence[WatchedSource],
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
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GraphCollector(statistics, sources))
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(middlewares=[_not_found])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", make_aiohttp_handler(self.registry))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]
        log.info("health and metrics on http://%s:%d/healthz and /metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def health(self) -> tuple[bool, str]:
        now = self.clock.now_ns()
        problems = [p for c in (*self.sources, *self.checks) if (p := c.health(now, self.offline_grace_ns))]
        return (not problems), ("ok" if not problems else "unhealthy: " + "; ".join(problems))

    def metrics(self) -> str:
        """What ``/metrics`` serves a plain scraper: Prometheus' text format."""
        return generate_latest(self.registry).decode()

    async def _healthz(self, request: web.Request) -> web.Response:
        ok, text = self.health()
        return web.Response(status=200 if ok else 503, text=text + "\n")


@web.middleware
async def _not_found(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return web.Response(status=404, text="try /healthz or /metrics\n")

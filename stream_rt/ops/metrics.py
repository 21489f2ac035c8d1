"""The graph's numbers as Prometheus metric families, read at scrape time.

:class:`GraphCollector` is a ``prometheus_client`` custom collector: each scrape reads
``Graph.statistics()`` and the sources' states and hands ``prometheus_client`` the
families below; the library writes the exposition (text or OpenMetrics), so every family
has HELP and TYPE and ``promtool check metrics`` finds nothing to say.

- ``stream_rt_node_total{node,counter}``: every counter of every node; a counter a node
  keeps per source (the trigger's events, change detection's light adjustments...) once
  per source, with a ``source`` label.
- ``stream_rt_node_level{node,level}``: every node's levels (``Node.gauges()``, e.g. a
  source's ``fps`` over the last 5 s; ``source`` for a level of one source), and the
  levels a node keeps among its counters (:data:`LEVELS_AMONG_COUNTERS`).
- ``stream_rt_channel_depth{edge}`` and ``stream_rt_channel_dropped_total{edge,reason}``.
- ``stream_rt_source_online{source}``: 1 while a source delivers media.
- one histogram per latency the nodes keep (``stream_rt_model_call_seconds``,
  ``stream_rt_event_answer_seconds``), labelled by ``node``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

LEVELS_AMONG_COUNTERS = frozenset({"outbox_depth"})
"""Counters a node keeps that are levels (they go down too): exported as levels, not as
totals (``outbox_depth``: messages the MQTT sink has not had acknowledged yet)."""


class NamedState(Protocol):
    """What the metrics read of a source: its name and whether it is online."""

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> str: ...


class GraphCollector(Collector):
    """Reads ``statistics()`` (``Graph.statistics``) and ``sources`` at each scrape."""

    def __init__(self, statistics: Callable[[], dict[str, Any]], sources: Sequence[NamedState]) -> None:
        self.statistics = statistics
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        stats = self.statistics()
        yield _node_totals(stats["nodes"], stats.get("by_source", {}))
        depth = GaugeMetricFamily("stream_rt_channel_depth", "packets waiting in a channel between two nodes",
                                  labels=["edge"])  # fmt: skip
        dropped = CounterMetricFamily("stream_rt_channel_dropped_total", "packets a channel dropped, by reason",
                                      labels=["edge", "reason"])  # fmt: skip
        for edge, channel in stats["edges"].items():
            depth.add_metric([edge], channel["depth"])
            for reason, n in channel["dropped"].items():
                dropped.add_metric([edge, reason], n)
        yield depth
        yield dropped
        online = GaugeMetricFamily("stream_rt_source_online", "1 while a source delivers media, else 0",
                                   labels=["source"])  # fmt: skip
        for source in self.sources:
            online.add_metric([source.name], int(source.state == "online"))
        yield online
        yield _node_levels(stats["nodes"], stats["gauges"])
        yield from _histograms(stats.get("histograms", {}))


def _node_totals(nodes: dict[str, dict[str, int]], by_source: dict[str, dict[str, dict[str, int]]]) -> Metric:
    """Each node's counters: those it counts per source once per source, the others once."""
    family = CounterMetricFamily("stream_rt_node_total", "what a node counted (label counter), by source if it can")
    for node, counters in nodes.items():
        split = {name for counts in by_source.get(node, {}).values() for name in counts}
        for name, value in counters.items():
            if name not in split and name not in LEVELS_AMONG_COUNTERS:
                family.add_sample("stream_rt_node_total", {"node": node, "counter": name}, value)
        for source, counts in by_source.get(node, {}).items():
            for name, value in counts.items():
                family.add_sample("stream_rt_node_total", {"node": node, "counter": name, "source": source}, value)
    return family


def _node_levels(nodes: dict[str, dict[str, int]], gauges: dict[str, dict[str, float]]) -> Metric:
    """Each node's levels; a level of one source is named ``<level>/<source>``."""
    family = GaugeMetricFamily("stream_rt_node_level", "a level a node reports (label level: fps, in_flight...)")
    for node in dict.fromkeys([*nodes, *gauges]):
        levels: dict[str, float] = {n: v for n, v in nodes.get(node, {}).items() if n in LEVELS_AMONG_COUNTERS}
        levels.update(gauges.get(node, {}))  # a node that reports it as a level too: the level wins
        for name, value in levels.items():
            level, _, source = name.partition("/")
            labels = {"node": node, "level": level} | ({"source": source} if source else {})
            family.add_sample("stream_rt_node_level", labels, value)
    return family


def _histograms(records: dict[str, dict[str, dict[str, Any]]]) -> Iterator[Metric]:
    """One family per histogram name (``Histogram.to_record()`` of each node keeping it)."""
    by_name: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for node, named in records.items():
        for name, record in named.items():
            by_name.setdefault(name, []).append((node, record))
    for name, series in sorted(by_name.items()):
        family = HistogramMetricFamily(f"stream_rt_{name}", series[0][1]["help"], labels=["node"])
        for node, record in series:
            bounds = [f"{b:g}" for b in record["bounds"]] + ["+Inf"]
            family.add_metric([node], list(zip(bounds, record["cumulative"], strict=True)), record["sum"])
        yield family

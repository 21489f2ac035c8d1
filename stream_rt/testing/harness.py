"""The node harness: run one node inside a real graph on what you give it, and the small
sources and events tests feed graphs with."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from stream_rt.graph.clock import Clock, ManualClock, ReplayClock
from stream_rt.graph.graph import Graph
from stream_rt.graph.node import Context, Node, Source, Supervision
from stream_rt.graph.packets import Event, Packet, Salience
from stream_rt.sinks.callback import CallbackSink

TINY_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni_thinker", "qwen3_omni_moe_thinker", "qwen3_vl", "smolvlm",
                    "idefics3", "llava", "llava_onevision", "gemma3", "internvl", "lfm2_vl", "mistral3")  # fmt: skip
"""The ``config.model_type`` values :func:`tiny_model` can write."""


def tiny_model(model_type: str, directory: str | Path | None = None, *, seed: int = 0) -> Path:
    """Write a tiny random-weight model of ``model_type`` (one of :data:`TINY_MODEL_TYPES`)
    into ``directory`` (default: a cache under ``$XDG_CACHE_HOME/stream_rt``, reused
    while it is complete) and return it. Needs the ``mllm`` extra; nothing is downloaded."""
    from stream_rt.mllm.tiny_models import build_tiny_model

    return build_tiny_model(model_type, directory, seed=seed)


class ListSource(Source):
    """Emits a fixed list of packets on port ``out``, then ends."""

    outputs = {"out": (Packet,)}

    def __init__(self, name: str, packets: Iterable[Packet]) -> None:
        super().__init__(name)
        self.packets = list(packets)

    async def run(self, ctx: Context) -> None:
        for packet in self.packets:
            await ctx.emit("out", packet)


async def run_node(
    node: Node,
    inputs: Iterable[Packet] | Mapping[str, Iterable[Packet]],
    *,
    clock: Clock | None = None,
    supervision: Supervision | None = None,
) -> dict[str, list[Packet]]:
    """Run ``node`` on ``inputs`` (a list for its only input port, or a dict by port) until
    every input has ended; return the packets it emitted on each output port, in order,
    control packets included."""
    if not isinstance(inputs, Mapping):
        if len(node.inputs) != 1:
            raise ValueError(f"node '{node.name}' has {len(node.inputs)} input ports: pass a dict by port")
        inputs = {next(iter(node.inputs)): inputs}
    graph = Graph(clock=clock or ManualClock())
    graph.add(node, supervision)
    for port, packets in inputs.items():
        feeder_type: Any = type("Feed", (ListSource,), {"outputs": {"out": node.inputs[port]}})
        graph.add(feeder_type(f"feed_{port}", packets))
        graph.connect(f"feed_{port}.out", f"{node.name}.{port}")
    outputs: dict[str, list[Packet]] = {port: [] for port in node.outputs}
    for port, collected in outputs.items():
        graph.add(CallbackSink(f"collect_{port}", collected.append, control=True))
        graph.connect(f"{node.name}.{port}", f"collect_{port}.in")
    await graph.run()
    return outputs


def numbered_event(i: int) -> Event:
    """Update event ``i`` of source ``cam`` (id ``cam-<i>``), for sink tests."""
    s = Salience("cam", i, i * 1_000_000, 0, 0.9, {"visual": 0.9})
    return Event("cam", i, s.pts_ns, 0, "update", f"cam-{i}", 0, None, 0.9, 0.9, s.components, (), True)


def feed_graph(sink: Node, ids: range, drain_timeout_s: float = 5.0, feed: type[ListSource] | None = None) -> Graph:
    """A graph that feeds the numbered events ``ids`` to ``sink``'s ``in`` port (through a
    ``feed``, by default :class:`PacedEvents`)."""
    graph = Graph(clock=ReplayClock(None), drain_timeout_s=drain_timeout_s)
    graph.add((feed or PacedEvents)("feed", [numbered_event(i) for i in ids]))
    graph.add(sink)
    graph.connect("feed.out", "mqtt.in", capacity=64)
    return graph


class PacedEvents(ListSource):
    """Emits its events at a steady pace (a pause after every 50), so that a broker outage
    falls in the middle of the stream."""

    outputs = {"out": (Event,)}

    async def run(self, ctx: Context) -> None:
        for i, packet in enumerate(self.packets):
            await ctx.emit("out", packet)
            if i % 50 == 49:
                await asyncio.sleep(0.01)

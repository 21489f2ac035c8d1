"""Test your own nodes the way stream_rt tests its own.

:func:`run_node` feeds packets into one node inside a real graph and returns what it
emitted, per output port::

    out = await run_node(MyDetector("det"), [frame1, frame2])
    assert [p.changed for p in out["changes"]] == [False, True]

Time-based behaviour runs on :class:`~stream_rt.graph.clock.ManualClock`; generated
frames and audio come from :class:`~stream_rt.sources.synthetic.SyntheticSource`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from stream_rt.graph.clock import Clock, ManualClock
from stream_rt.graph.graph import Graph
from stream_rt.graph.node import Context, Node, Source, Supervision
from stream_rt.graph.packets import Packet
from stream_rt.sinks.callback import CallbackSink
from stream_rt.sources.synthetic import SyntheticSource

__all__ = ["ListSource", "ManualClock", "SyntheticSource", "run_node"]


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

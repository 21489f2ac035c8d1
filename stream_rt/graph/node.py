"""The node contract.

A node declares typed ports as class attributes::

    class Brightness(Node):
        inputs = {"video": (VideoFrame,)}
        outputs = {"level": (Level,)}

        async def process(self, packet, ctx):
            await ctx.emit("level", Level(...))

The graph checks at build time that every connection carries types the receiving port
accepts. ``start()`` / ``stop()`` bracket a node's life. ``process()`` receives the data
packets of every input port (``ctx.port`` names the port); control packets go to
``on_control()``. The graph forwards a :class:`Flush` downstream and an
:class:`EndOfStream` once every input has ended; any other control packet (a
:class:`SourceStatus`) stops at the node that receives it, which emits it on if its
consumers need it, so each consumer sees it once, in order with the node's output.
CPU-heavy work belongs off the event loop (``asyncio.to_thread`` or a GIL-releasing
kernel).

A :class:`Source` has no inputs and implements ``run()``, producing until it is done or
``ctx.stopping`` is set; the graph sends its :class:`EndOfStream` when ``run()`` returns.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from stream_rt.graph.backoff import Backoff
from stream_rt.graph.channel import Channel
from stream_rt.graph.histogram import Histogram
from stream_rt.graph.packets import ControlPacket, Packet

if TYPE_CHECKING:
    from stream_rt.graph.clock import Clock

PortTypes = tuple[type[Packet], ...]


@dataclass(frozen=True)
class Supervision:
    """What the graph does when a node raises.

    ``restart``: log it with the node's name, call ``stop()`` then ``start()`` after an
    exponential backoff (``backoff_s`` doubling up to ``max_backoff_s``) and go on with
    the next packet; after ``max_restarts`` restarts the graph stops.
    ``stop``: log it and stop the whole graph (``Graph.run`` raises :class:`NodeFailed`).
    """

    on_error: Literal["restart", "stop"] = "stop"
    max_restarts: int | None = 10
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def backoff(self, restarts: int) -> float:
        """The wait before restart number ``restarts`` (1: the first)."""
        return Backoff(self.backoff_s, self.max_backoff_s, jitter=0.0).delay(restarts - 1)


class NodeFailed(RuntimeError):
    """A node raised and its supervision policy stopped the graph."""

    def __init__(self, node: str, error: BaseException) -> None:
        super().__init__(f"node '{node}' failed: {describe_error(error)}")
        self.node = node
        self.error = error


def describe_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class Context:
    """What a node sees of the graph: emit, the clock, counters, and whether to stop."""

    def __init__(
        self,
        node_name: str,
        clock: Clock,
        outputs: dict[str, list[Channel]],
        declared: dict[str, PortTypes],
        stopping: asyncio.Event,
    ) -> None:
        self.node_name = node_name
        self.clock = clock
        self.port = ""
        self.stopping = stopping
        self.counters: Counter[str] = Counter()
        self.source_counters: dict[str, Counter[str]] = {}
        self._outputs = outputs
        self._declared = declared
        self._allowed = {port: (*types, ControlPacket) for port, types in declared.items()}

    async def emit(self, port: str, packet: Packet) -> None:
        """Send ``packet`` on output ``port`` to every connected channel (waits only where a
        ``block`` channel is full)."""
        channels = self._outputs.get(port)
        if channels is None:
            raise KeyError(f"node '{self.node_name}' has no output port '{port}'")
        if not isinstance(packet, self._allowed[port]):
            raise TypeError(
                f"node '{self.node_name}' emitted {type(packet).__name__} on port '{port}', "
                f"which declares {' | '.join(t.__name__ for t in self._declared[port])}"
            )
        for channel in channels:
            if channel.has_room:
                channel.put_nowait(packet)
            else:
                await channel.put(packet)

    def count(self, name: str, n: int = 1, source: str | None = None) -> None:
        """Add to one of this node's counters (shown in ``Graph.statistics()`` and metrics);
        with ``source``, also to that source's share of it (metrics label it)."""
        self.counters[name] += n
        if source is not None:
            self.source_counters.setdefault(source, Counter())[name] += n


class Node:
    """Base class of every graph node. Subclasses set ``inputs``/``outputs`` and override hooks."""

    inputs: ClassVar[dict[str, PortTypes]] = {}
    outputs: ClassVar[dict[str, PortTypes]] = {}
    is_sink: ClassVar[bool] = False

    def __init__(self, name: str) -> None:
        if not name or "." in name:
            raise ValueError(f"node name must be non-empty and contain no '.', got {name!r}")
        self.name = name

    async def start(self, ctx: Context) -> None:
        """Called once before the first packet, and again after each supervised restart."""

    async def process(self, packet: Packet, ctx: Context) -> None:
        """Handle one data packet from input port ``ctx.port``."""

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        """See a control packet (default: nothing). Afterwards the graph forwards a
        :class:`Flush` downstream, and an :class:`EndOfStream` once every input has ended."""

    async def stop(self, ctx: Context) -> None:
        """Called once at the end (after the last packet), and before each restart."""

    def gauges(self, now_ns: int) -> dict[str, float]:
        """Current levels worth exporting (frames per second, items held...); default none.
        A level of one source is named ``<gauge>/<source>`` (metrics label it)."""
        return {}

    def histograms(self) -> dict[str, Histogram]:
        """Distributions worth exporting (latencies), by name; default none."""
        return {}


class Source(Node):
    """A node with no inputs that produces packets in :meth:`run`."""

    async def run(self, ctx: Context) -> None:
        raise NotImplementedError


class Sink(Node):
    """A node with no outputs. Sinks are stopped last so nothing in flight is lost."""

    is_sink = True

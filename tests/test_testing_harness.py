"""stream_rt.testing runs one node the way users test their own operators."""

from __future__ import annotations

import numpy as np
import pytest

from stream_rt import Context, EndOfStream, Node, Packet, VideoFrame
from stream_rt.testing import run_node


class Threshold(Node):
    inputs = {"video": (VideoFrame,)}
    outputs = {"bright": (VideoFrame,), "dark": (VideoFrame,)}

    async def process(self, packet: Packet, ctx: Context) -> None:
        assert isinstance(packet, VideoFrame)
        await ctx.emit("bright" if packet.y.mean() > 128 else "dark", packet)
        ctx.count("seen")


def frame(seq: int, level: int) -> VideoFrame:
    return VideoFrame("cam", seq, seq, 0, np.full((4, 4), level, np.uint8))


async def test_run_node_returns_outputs_per_port_with_end_of_stream() -> None:
    out = await run_node(Threshold("t"), [frame(0, 10), frame(1, 200), frame(2, 250)])
    assert [p.seq for p in out["bright"] if isinstance(p, VideoFrame)] == [1, 2]
    assert [p.seq for p in out["dark"] if isinstance(p, VideoFrame)] == [0]
    assert isinstance(out["bright"][-1], EndOfStream) and isinstance(out["dark"][-1], EndOfStream)


async def test_run_node_needs_ports_named_for_several_inputs() -> None:
    class TwoInputs(Node):
        inputs = {"a": (VideoFrame,), "b": (VideoFrame,)}

    with pytest.raises(ValueError, match="has 2 input ports"):
        await run_node(TwoInputs("two"), [frame(0, 0)])

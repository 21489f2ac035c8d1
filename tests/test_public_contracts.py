"""What a robot developer touches states its contract: every public name has a docstring
of its own, and a closed PushSource refuses more frames instead of losing them."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import stream_rt
from stream_rt import CallbackSink, Graph, ManualClock, Packet, PushSource, VideoFrame


@pytest.mark.parametrize("name", sorted(stream_rt.__all__))
def test_every_public_name_has_a_docstring_stating_its_contract(name: str) -> None:
    obj = getattr(stream_rt, name)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return  # a constant: documented where it is defined
    own = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    assert own, f"{name} has no docstring of its own"
    assert not own.startswith(f"{name}("), f"{name}'s docstring is the one dataclasses write"
    assert len(own.split()) >= 10, f"{name}'s docstring says too little to be a contract: {own!r}"


async def test_a_push_after_close_is_refused_and_what_came_before_is_delivered() -> None:
    camera = PushSource("robot_cam")
    rgb = np.zeros((48, 64, 3), np.uint8)
    camera.push(rgb, pts_ns=0)
    camera.close()
    with pytest.raises(RuntimeError, match="after close"):
        camera.push(rgb, pts_ns=1)
    camera.close()  # a second close changes nothing
    got: list[Packet] = []
    graph = Graph(clock=ManualClock())
    graph.add(camera)
    graph.add(CallbackSink("frames", got.append))
    graph.connect("robot_cam.video", "frames.in")
    await graph.run()
    assert [p.pts_ns for p in got if isinstance(p, VideoFrame)] == [0]

"""Clocks: replay pacing at a given speed, as fast as possible, and the manual test clock."""

from __future__ import annotations

import asyncio
import time

import pytest

from stream_rt import CallbackSink, Graph, ManualClock, Packet, ReplayClock, SyntheticSource


async def replay_wall_time(speed: float | None, frames: int = 11, fps: float = 50.0) -> float:
    graph = Graph(clock=ReplayClock(speed))
    got: list[Packet] = []
    graph.add(SyntheticSource("cam", frames=frames, fps=fps))
    graph.add(CallbackSink("sink", got.append))
    graph.connect("cam.video", "sink.in")
    started = time.monotonic()
    await graph.run()
    assert len(got) == frames
    return time.monotonic() - started


async def test_replay_clock_paces_media_time() -> None:
    # 11 frames at 50 fps span 0.2 s of media.
    assert 0.18 <= await replay_wall_time(1.0) < 0.6
    assert 0.09 <= await replay_wall_time(2.0) < 0.4
    assert await replay_wall_time(None) < 0.1


def test_replay_speed_must_be_positive() -> None:
    with pytest.raises(ValueError, match="replay speed must be > 0"):
        ReplayClock(0)


async def test_manual_clock_wakes_sleepers_in_deadline_order() -> None:
    clock = ManualClock()
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(f"{name}@{clock.now_ns() / 1e9:g}")

    tasks = [asyncio.create_task(sleeper("b", 2)), asyncio.create_task(sleeper("a", 1))]
    await asyncio.sleep(0)
    await clock.advance(0.5)
    assert woke == []
    await clock.advance(2)
    await asyncio.gather(*tasks)
    assert woke == ["a@1", "b@2"]
    assert clock.now_ns() == 2_500_000_000

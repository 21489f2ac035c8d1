"""Channel policies: what each drops, that it counts it, and that control packets survive."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stream_rt import Channel, EndOfStream, Flush, SourceStatus, VideoFrame


def frame(seq: int) -> VideoFrame:
    return VideoFrame("cam", seq, seq * 100, 0, np.zeros((2, 2), np.uint8))


def drain(channel: Channel) -> list[object]:
    out = []
    while (packet := channel.get_nowait()) is not None:
        out.append(packet)
    return out


def seqs(packets: list[object]) -> list[int]:
    return [p.seq for p in packets if isinstance(p, VideoFrame)]


async def test_drop_oldest_keeps_the_newest_and_counts() -> None:
    channel = Channel("e", "drop_oldest", capacity=3)
    for i in range(10):
        await channel.put(frame(i))
    assert seqs(drain(channel)) == [7, 8, 9]
    stats = channel.statistics()
    assert stats.dropped == {"drop_oldest": 7}
    assert stats.put == 10 and stats.delivered == 3


async def test_drop_newest_keeps_the_first_and_counts() -> None:
    channel = Channel("e", "drop_newest", capacity=3)
    for i in range(10):
        await channel.put(frame(i))
    assert seqs(drain(channel)) == [0, 1, 2]
    assert channel.statistics().dropped == {"drop_newest": 7}


async def test_latest_holds_one_slot() -> None:
    channel = Channel("e", "latest", capacity=50)
    assert channel.capacity == 1
    for i in range(5):
        await channel.put(frame(i))
    assert seqs(drain(channel)) == [4]
    assert channel.statistics().dropped == {"latest": 4}


async def test_block_waits_for_room_and_drops_nothing() -> None:
    channel = Channel("e", "block", capacity=2)
    await channel.put(frame(0))
    await channel.put(frame(1))
    blocked = asyncio.create_task(channel.put(frame(2)))
    await asyncio.sleep(0.01)
    assert not blocked.done(), "a full block channel must make the producer wait"
    assert channel.get_nowait().seq == 0  # type: ignore[union-attr]
    await asyncio.wait_for(blocked, 1)
    assert seqs(drain(channel)) == [1, 2]
    assert channel.statistics().dropped == {}


@pytest.mark.parametrize("policy", ["block", "drop_oldest", "drop_newest", "latest"])
async def test_control_packets_survive_a_full_queue(policy: str) -> None:
    channel = Channel("e", policy, capacity=2)  # type: ignore[arg-type]
    await channel.put(frame(0))
    await channel.put(frame(1))
    status = SourceStatus("cam", -1, -1, 0, "offline", "lost")
    eos = EndOfStream("cam", -1, -1, 0)
    # Control packets never wait and are never dropped, even with the data slots full.
    await asyncio.wait_for(channel.put(status), 0.5)
    for i in range(2, 6):
        if policy != "block":
            await channel.put(frame(i))
    await asyncio.wait_for(channel.put(eos), 0.5)
    out = drain(channel)
    assert status in out and eos in out
    assert out[-1] is eos, "end of stream stays behind every packet put before it"
    assert out.index(status) < out.index(eos)


async def test_flush_discards_queued_data_but_not_control() -> None:
    channel = Channel("e", "block", capacity=10)
    for i in range(3):
        await channel.put(frame(i))
    status = SourceStatus("cam", -1, -1, 0, "online")
    await channel.put(status)
    await channel.put(frame(3))
    await channel.put(Flush("cam", -1, -1, 0))
    await channel.put(frame(4))
    out = drain(channel)
    assert out[0] is status and isinstance(out[1], Flush) and seqs(out) == [4]
    assert channel.statistics().dropped == {"flush": 4}


async def test_closed_channel_discards_and_releases_producer() -> None:
    channel = Channel("e", "block", capacity=1)
    await channel.put(frame(0))
    blocked = asyncio.create_task(channel.put(frame(1)))
    await asyncio.sleep(0.01)
    channel.close()
    await asyncio.wait_for(blocked, 1)
    assert channel.statistics().dropped == {"closed": 1}


def test_bad_policy_and_capacity_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown channel policy 'fifo'"):
        Channel("e", "fifo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        Channel("e", "block", capacity=0)

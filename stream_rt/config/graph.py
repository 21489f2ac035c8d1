"""The graph's settings: how long a stop drains, and the channels between sources and
their consumers (what is dropped when a consumer is behind)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from stream_rt.config.base import StrictModel

PolicyName = Literal["block", "drop_oldest", "drop_newest", "latest"]


class ChannelConfig(StrictModel):
    policy: PolicyName = Field(
        "block",
        title="Full-channel policy",
        description="when the consumer is behind: 'block' the producer (lossless), 'drop_oldest', 'drop_newest', "
        "or keep only the 'latest' packet",
    )
    capacity: int = Field(8, ge=1, title="Capacity", description="packets the channel holds")


LOSSLESS_CHANNELS: dict[str, dict[str, Any]] = {
    "video_channel": {"policy": "block", "capacity": 4},
    "audio_channel": {"policy": "block", "capacity": 64},
}
"""Channel settings for offline replays and evaluations: every edge blocks, nothing drops
(the live defaults drop video for slow stages). A video queue of 4 keeps few decoded
frames in flight, which keeps the decoder fast (benchmarks/RESULTS.md)."""


class GraphConfig(StrictModel):
    drain_timeout_s: float = Field(
        5.0, ge=0, title="Drain timeout (s)", description="on stop, how long in-flight packets may drain"
    )
    video_channel: ChannelConfig = Field(
        default_factory=lambda: ChannelConfig(policy="latest", capacity=1),
        title="Video channel",
        description="queue between a source's video and its consumers",
    )
    audio_channel: ChannelConfig = Field(
        default_factory=lambda: ChannelConfig(policy="drop_oldest", capacity=64),
        title="Audio channel",
        description="queue between a source's audio and its consumers",
    )

"""The dataflow core: packets, the node contract, channels, clocks and the graph."""

from stream_rt.graph.backoff import Backoff
from stream_rt.graph.channel import POLICIES, Channel, ChannelStats, Policy
from stream_rt.graph.clock import Clock, ManualClock, RealtimeClock, ReplayClock
from stream_rt.graph.graph import Graph, GraphBuildError
from stream_rt.graph.node import Context, Node, NodeFailed, Sink, Source, Supervision
from stream_rt.graph.packets import (
    AUDIO_SAMPLE_RATE,
    AudioChunk,
    AudioFeatures,
    Box,
    ChangeMap,
    ControlPacket,
    DetectedObject,
    EndOfStream,
    Event,
    Flush,
    MllmAnswer,
    MllmRequest,
    Packet,
    Salience,
    SourceStatus,
    StreamEnded,
    VideoFrame,
)

__all__ = [
    "AUDIO_SAMPLE_RATE",
    "POLICIES",
    "AudioChunk",
    "AudioFeatures",
    "Backoff",
    "Box",
    "ChangeMap",
    "Channel",
    "ChannelStats",
    "Clock",
    "Context",
    "ControlPacket",
    "DetectedObject",
    "EndOfStream",
    "Event",
    "Flush",
    "Graph",
    "GraphBuildError",
    "ManualClock",
    "MllmAnswer",
    "MllmRequest",
    "Node",
    "NodeFailed",
    "Packet",
    "Policy",
    "RealtimeClock",
    "ReplayClock",
    "Salience",
    "Sink",
    "Source",
    "SourceStatus",
    "StreamEnded",
    "Supervision",
    "VideoFrame",
]

"""Every kind of packet that flows through a stream_rt graph, listed here and written in
one module per concern:

- :mod:`~stream_rt.graph.packets.base`: :class:`Packet`, :class:`ControlPacket`;
- :mod:`~stream_rt.graph.packets.media`: :class:`VideoFrame`, :class:`AudioChunk`;
- :mod:`~stream_rt.graph.packets.perception`: :class:`ChangeMap`, :class:`AudioFeatures`,
  :class:`DetectedObject`, :class:`Word`, :class:`Transcript`, :class:`TranscribedUntil`,
  :class:`Salience`;
- :mod:`~stream_rt.graph.packets.events`: :class:`Event`, :class:`WatchState`;
- :mod:`~stream_rt.graph.packets.model`: :class:`MllmRequest`, :class:`MllmAnswer`;
- :mod:`~stream_rt.graph.packets.control`: :class:`EndOfStream`, :class:`StreamEnded`,
  :class:`Flush`, :class:`SourceStatus`.

Packets are small frozen dataclasses. Each carries:

- ``source_id``: the source that produced it (or that it is about),
- ``seq``: monotonic per source, shared by all packets a source emits,
- ``pts_ns``: media time in nanoseconds, sanitised to be monotonic per source and kind,
- ``wall_ns``: wall-clock time (from the graph's clock) when it was made.

Control packets made outside the media flow (status, end of stream) carry ``seq = -1``
and ``pts_ns = -1``.

Data packets may be dropped by a channel policy; :class:`ControlPacket` subclasses never are.
"""

from stream_rt.graph.packets.base import ControlPacket, Packet
from stream_rt.graph.packets.control import EndOfStream, Flush, SourceStatus, StreamEnded
from stream_rt.graph.packets.events import Event, WatchState
from stream_rt.graph.packets.media import AUDIO_SAMPLE_RATE, AudioChunk, VideoFrame
from stream_rt.graph.packets.model import AnswerStatus, MllmAnswer, MllmRequest
from stream_rt.graph.packets.perception import (
    ALL_TRANSCRIBED_NS,
    AudioFeatures,
    Box,
    ChangeMap,
    DetectedObject,
    Salience,
    TranscribedUntil,
    Transcript,
    Word,
)

__all__ = [
    "ALL_TRANSCRIBED_NS",
    "AUDIO_SAMPLE_RATE",
    "AnswerStatus",
    "AudioChunk",
    "AudioFeatures",
    "Box",
    "ChangeMap",
    "ControlPacket",
    "DetectedObject",
    "EndOfStream",
    "Event",
    "Flush",
    "MllmAnswer",
    "MllmRequest",
    "Packet",
    "Salience",
    "SourceStatus",
    "StreamEnded",
    "TranscribedUntil",
    "Transcript",
    "VideoFrame",
    "WatchState",
    "Word",
]

"""stream_rt: a runtime for agents that watch live video and audio.

The public API. Everything a program needs to build, run and test a pipeline is
importable from here, each name with a docstring stating its contract; the package is
typed (``py.typed``). Two submodules are public as well: :mod:`stream_rt.testing` (the
node harness and the services the project's own tests use) and :mod:`stream_rt.media.images`
(decoding, luma, resizing and JPEG encoding of pictures). Other submodules are
implementation detail.
"""

from typing import Any

from stream_rt.config import Config, ConfigError, load_config, parse_config
from stream_rt.graph import (
    AUDIO_SAMPLE_RATE,
    AudioChunk,
    AudioFeatures,
    ChangeMap,
    Channel,
    ChannelStats,
    Clock,
    Context,
    ControlPacket,
    DetectedObject,
    EndOfStream,
    Event,
    Flush,
    Graph,
    GraphBuildError,
    ManualClock,
    MllmAnswer,
    MllmRequest,
    Node,
    NodeFailed,
    Packet,
    RealtimeClock,
    ReplayClock,
    Salience,
    Sink,
    Source,
    SourceStatus,
    StreamEnded,
    Supervision,
    VideoFrame,
    WatchState,
)
from stream_rt.memory.history import History, HistoryEntry
from stream_rt.mllm import Backend, MissingWeights, MllmStage, ModelUnavailable, OpenAIBackend
from stream_rt.mllm.history_ask import HistoryAnswer, ask_history
from stream_rt.operators.audio import AudioAnalyzer
from stream_rt.operators.change import ChangeDetector
from stream_rt.operators.detectors import load_detector
from stream_rt.operators.objects import ObjectGate
from stream_rt.operators.salience import SalienceFusion
from stream_rt.operators.zones import SceneLayout
from stream_rt.pipeline import Pipeline, build_pipeline
from stream_rt.policies.trigger import TriggerPolicy
from stream_rt.policies.watches import WatchBook
from stream_rt.sinks import CallbackSink, JsonlSink, MqttSink
from stream_rt.sources import AvSource, Backoff, MqttSource, PushSource, SourceError, SyntheticSource
from stream_rt.version import __version__ as __version__


def __getattr__(name: str) -> Any:
    """``TransformersBackend`` and ``build_smoke_model`` import torch: loaded on first use."""
    if name in ("TransformersBackend", "build_smoke_model"):
        import stream_rt.mllm

        return getattr(stream_rt.mllm, name)
    raise AttributeError(f"module 'stream_rt' has no attribute '{name}'")


__all__ = [
    "AUDIO_SAMPLE_RATE",
    "AudioAnalyzer",
    "AudioChunk",
    "AudioFeatures",
    "AvSource",
    "Backend",
    "Backoff",
    "CallbackSink",
    "ChangeDetector",
    "ChangeMap",
    "Channel",
    "ChannelStats",
    "Clock",
    "Config",
    "ConfigError",
    "Context",
    "ControlPacket",
    "DetectedObject",
    "EndOfStream",
    "Event",
    "Flush",
    "Graph",
    "GraphBuildError",
    "History",
    "HistoryAnswer",
    "HistoryEntry",
    "JsonlSink",
    "ManualClock",
    "MissingWeights",
    "MllmAnswer",
    "MllmRequest",
    "MllmStage",
    "ModelUnavailable",
    "MqttSink",
    "MqttSource",
    "Node",
    "NodeFailed",
    "ObjectGate",
    "OpenAIBackend",
    "Packet",
    "Pipeline",
    "PushSource",
    "RealtimeClock",
    "ReplayClock",
    "Salience",
    "SalienceFusion",
    "SceneLayout",
    "Sink",
    "Source",
    "SourceError",
    "SourceStatus",
    "StreamEnded",
    "Supervision",
    "SyntheticSource",
    "TransformersBackend",
    "TriggerPolicy",
    "VideoFrame",
    "WatchBook",
    "WatchState",
    "ask_history",
    "build_pipeline",
    "build_smoke_model",
    "load_config",
    "load_detector",
    "parse_config",
]

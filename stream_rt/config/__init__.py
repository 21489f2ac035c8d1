"""The pipeline configuration: pydantic models, one module per concern, that reject unknown
keys; every field has a title and a description (``docs/CONFIG.md`` is generated from them).

- :mod:`~stream_rt.config.root`: :class:`Config`, :func:`load_config`, :func:`parse_config`
- :mod:`~stream_rt.config.sources`: a ``[[sources]]`` entry, its reconnect backoff
- :mod:`~stream_rt.config.perception`: ``[change]``, ``[detect]``, ``[audio]``, ``[salience]``
- :mod:`~stream_rt.config.trigger`: ``[trigger]``
- :mod:`~stream_rt.config.effective`: a source's effective settings (:func:`effective_settings`)
- :mod:`~stream_rt.config.mllm`: ``[mllm]`` and its techniques
- :mod:`~stream_rt.config.history`: ``[history]``
- :mod:`~stream_rt.config.sinks`, :mod:`~stream_rt.config.ops`, :mod:`~stream_rt.config.graph`,
  :mod:`~stream_rt.config.watches`, :mod:`~stream_rt.config.zones`

The package depends on nothing else of stream_rt; the nodes take their section itself.
"""

from stream_rt.config.base import ConfigError, StrictModel
from stream_rt.config.effective import SourceSettings, effective_settings
from stream_rt.config.graph import LOSSLESS_CHANNELS, ChannelConfig, GraphConfig, PolicyName
from stream_rt.config.history import HistoryConfig
from stream_rt.config.mllm import ClipConfig, MemoryConfig, MllmConfig, TokenReuseConfig
from stream_rt.config.ops import LoggingConfig, OpsConfig
from stream_rt.config.perception import (
    AudioGateConfig,
    ChangeConfig,
    DetectConfig,
    SalienceConfig,
    TranscriptionConfig,
)
from stream_rt.config.root import Config, for_replay, load_config, parse_config
from stream_rt.config.sinks import JsonlSinkConfig, MqttSinkConfig, SinksConfig
from stream_rt.config.sources import BackoffConfig, InputConfig, SourceConfig, synthetic_parameters
from stream_rt.config.trigger import TriggerConfig
from stream_rt.config.watches import MAX_WATCH_S, WatchConfig, WatchId
from stream_rt.config.zones import Point, Polygon

__all__ = [
    "LOSSLESS_CHANNELS",
    "MAX_WATCH_S",
    "AudioGateConfig",
    "BackoffConfig",
    "ChangeConfig",
    "ChannelConfig",
    "ClipConfig",
    "Config",
    "ConfigError",
    "DetectConfig",
    "GraphConfig",
    "HistoryConfig",
    "InputConfig",
    "JsonlSinkConfig",
    "LoggingConfig",
    "MemoryConfig",
    "MllmConfig",
    "MqttSinkConfig",
    "OpsConfig",
    "Point",
    "PolicyName",
    "Polygon",
    "SalienceConfig",
    "SinksConfig",
    "SourceConfig",
    "SourceSettings",
    "StrictModel",
    "TokenReuseConfig",
    "TranscriptionConfig",
    "TriggerConfig",
    "WatchConfig",
    "WatchId",
    "effective_settings",
    "for_replay",
    "load_config",
    "parse_config",
    "synthetic_parameters",
]

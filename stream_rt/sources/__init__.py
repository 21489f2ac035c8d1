"""Sources: PyAV (files, URLs, devices), frames over MQTT, and a synthetic source for tests."""

from stream_rt.graph.backoff import Backoff
from stream_rt.sources.av_source import AvSource, SourceError
from stream_rt.sources.mqtt_source import MqttSource
from stream_rt.sources.synthetic import SyntheticSource

__all__ = ["AvSource", "Backoff", "MqttSource", "SourceError", "SyntheticSource"]

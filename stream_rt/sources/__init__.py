"""Sources: PyAV (files, URLs, devices), frames over MQTT, frames pushed by the program,
and a synthetic source for tests and load runs."""

from stream_rt.graph.backoff import Backoff
from stream_rt.sources.av_source import AvSource, SourceError
from stream_rt.sources.mqtt_source import MqttSource
from stream_rt.sources.push import PushSource
from stream_rt.sources.synthetic import SyntheticSource

__all__ = ["AvSource", "Backoff", "MqttSource", "PushSource", "SourceError", "SyntheticSource"]

"""Sinks: where packets leave the process."""

from stream_rt.sinks.callback import CallbackSink
from stream_rt.sinks.jsonl import JsonlSink
from stream_rt.sinks.mqtt import MqttSink

__all__ = ["CallbackSink", "JsonlSink", "MqttSink"]

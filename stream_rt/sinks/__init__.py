"""Sinks: where packets leave the process."""

from stream_rt.sinks.callback import CallbackSink
from stream_rt.sinks.jsonl import JsonlSink

__all__ = ["CallbackSink", "JsonlSink"]

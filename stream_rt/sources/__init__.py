"""Sources: PyAV (files, URLs, devices) and a synthetic source for tests."""

from stream_rt.graph.backoff import Backoff
from stream_rt.sources.av_source import AvSource, SourceError
from stream_rt.sources.synthetic import SyntheticSource

__all__ = ["AvSource", "Backoff", "SourceError", "SyntheticSource"]

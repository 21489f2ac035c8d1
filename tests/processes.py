"""Test-only glue: pytest's ``record_property`` type for the fault tests. The services
tests run (cameras, broker, certificates) are the package's own test harness
(:mod:`stream_rt.testing`), re-exported here for the tests that import them from here."""

from __future__ import annotations

from collections.abc import Callable

from stream_rt.testing import LaggingAvServer, RtspCamera, StreamServer, make_certificates

__all__ = ["LaggingAvServer", "RecordProperty", "RtspCamera", "StreamServer", "make_certificates"]

RecordProperty = Callable[[str, object], None]
"""pytest's ``record_property`` fixture: figures of a fault test for ``benchmarks/faults.py``."""

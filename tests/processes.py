"""Test-only glue: pytest's ``record_property`` type for the fault tests. The services
tests run (cameras, broker, certificates) come from the package's own test harness,
:mod:`stream_rt.testing`."""

from __future__ import annotations

from collections.abc import Callable

RecordProperty = Callable[[str, object], None]
"""pytest's ``record_property`` fixture: figures of a fault test for ``benchmarks/faults.py``."""

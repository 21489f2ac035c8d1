"""One place that configures log output for the CLI and daemons."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str = "info") -> None:
    """Log to stderr at ``level`` ('debug', 'info', 'warning', 'error')."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root = logging.getLogger("stream_rt")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False

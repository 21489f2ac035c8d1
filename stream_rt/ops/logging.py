"""One place that configures log output for the CLI and daemons.

``text``: one human-readable line per record. ``json``: one JSON object per line
(``ts``, ``level``, ``logger``, ``message``, and ``source`` when the record names one),
for journald or a log shipper.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Literal

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        source = getattr(record, "source", None)
        if source is not None:
            entry["source"] = source
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(entry)


def setup_logging(level: str = "info", fmt: Literal["text", "json"] = "text") -> None:
    """Log to stderr at ``level`` ('debug', 'info', 'warning', 'error') in ``fmt``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root = logging.getLogger("stream_rt")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False

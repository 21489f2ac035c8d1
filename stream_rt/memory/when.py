"""Times people write when they ask about the past: ``2h``, ``today``, ISO 8601.

:func:`parse_when` turns one into wall-clock nanoseconds since the Unix epoch:

- a span back from now: a number and a unit, ``90s``, ``15m``, ``2h``, ``3d``, ``1w``
  (``1.5h`` too);
- ``now``, ``today`` (since local midnight), ``yesterday`` (the local midnight before);
- an ISO 8601 date or time (``2025-06-01``, ``2025-06-01T08:30``, ``2025-06-01 08:30:00+02:00``);
  without a zone it is local time.

Anything else raises :class:`ValueError` saying what is accepted.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
ACCEPTED = "a span back from now (90s, 15m, 2h, 3d, 1w), now, today, yesterday, or an ISO time (2025-06-01T08:30)"


def parse_when(text: str, now_ns: int) -> int:
    """Wall-clock nanoseconds of ``text`` (see the module docstring), relative to ``now_ns``."""
    word = text.strip().lower()
    now = datetime.fromtimestamp(now_ns / 1e9).astimezone()
    if span := SPAN.match(word):
        back_ns = float(span.group(1)) * UNITS_S[span.group(2).lower()] * 1e9
        return max(-(2**63), now_ns - int(min(back_ns, 2.0**64)))  # a span beyond int64: since the beginning
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    named = {"now": now, "today": midnight, "yesterday": midnight - timedelta(days=1)}
    if word in named:
        return _ns(named[word])
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"cannot read the time {text.strip()[:40]!r}: give {ACCEPTED}") from None
    return _ns(moment if moment.tzinfo is not None else moment.astimezone())


def _ns(moment: datetime) -> int:
    """Nanoseconds since the epoch, within what SQLite and numpy hold (int64: years 1678-2262)."""
    return max(-(2**63), min(2**63 - 1, int(moment.timestamp() * 1_000_000) * 1000))

"""Identities that stay unique across sources, restarts and daemons sharing a broker.

- :func:`time_ordered_id`: a ULID (48 bits of milliseconds since the Unix epoch, then 80
  random bits, 26 Crockford base-32 characters), strictly increasing within a process and
  sortable by creation time, with no coordination between processes.
- :class:`SequenceNumbers`: per key, integers that only increase, also across restarts:
  each is the wall time in microseconds when it was issued, or the previous one plus one
  if that is larger, so a later process starts above every number an earlier one gave
  (unless the wall clock is set back).
"""

from __future__ import annotations

import secrets
import threading
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS = 80
_lock = threading.Lock()
_last = 0  # the last id issued, as a 128-bit integer


def time_ordered_id(now_ms: int | None = None) -> str:
    """A new ULID: sortable by time, unique without coordination."""
    global _last
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    with _lock:
        value = (ms << _RANDOM_BITS) | secrets.randbits(_RANDOM_BITS)
        if value <= _last:  # the same millisecond (or a clock set back): keep increasing
            value = _last + 1
        _last = value
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


class SequenceNumbers:
    """Increasing integers per key, seeded from the wall clock (see the module docstring)."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def next(self, key: str, wall_ns: int) -> int:
        value = max(self._last.get(key, 0) + 1, wall_ns // 1000)
        self._last[key] = value
        return value

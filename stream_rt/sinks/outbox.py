"""A durable outbox: messages wait in SQLite until the broker acknowledges them.

Every message is committed to the database before anyone tries to publish it and is
deleted only after the broker's acknowledgement, so a broker outage, a crash or a restart
loses nothing: the next process drains what is left, oldest first. A message that was
published but not yet deleted when the process died is sent again after the restart,
with the same payload (and so the same event id), so consumers can drop the duplicate.

The database runs in WAL mode with ``synchronous=NORMAL``: a committed message survives
the process being killed; an operating-system crash may lose the last few.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,"
            " qos INTEGER NOT NULL, retain INTEGER NOT NULL)"
        )
        # Counted once, then kept up to date: the sink reads it after every event.
        self._depth = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def add(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Store a message durably; returns its id (ids increase in the order of adding)."""
        cursor = self._db.execute(
            "INSERT INTO outbox (topic, payload, qos, retain) VALUES (?, ?, ?, ?)", (topic, payload, qos, int(retain))
        )
        self._depth += 1
        return int(cursor.lastrowid or 0)

    def pending(self, limit: int = 100) -> list[OutboxMessage]:
        """The oldest messages not yet acknowledged."""
        rows = self._db.execute(
            "SELECT id, topic, payload, qos, retain FROM outbox ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [OutboxMessage(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows]

    def ack(self, message_id: int) -> None:
        """The broker has the message: forget it."""
        self._depth -= self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,)).rowcount

    def depth(self) -> int:
        """Messages not yet acknowledged."""
        return self._depth

    def close(self) -> None:
        self._db.close()

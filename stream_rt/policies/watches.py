"""Standing watches: a condition the model re-checks on every call for a source until it
expires ("tell me when my guests arrive", as Frigate's camera monitor does).

A watch has an ``id``, its ``source``, a ``condition`` in words and an optional expiry.
While it is set, every model call for that source also asks the condition, and the answer
contract's ``condition_met`` says whether it holds. The watch's state — ``unmet`` or
``met`` — flips only once ``confirm`` answers in a row say the other (one odd answer does
not flip it). Each flip is a :class:`~stream_rt.graph.packets.WatchState` transition; so
are setting a watch (``unmet``), its expiry (``expired``) and its removal (``removed``).
Transitions wait in the book until :meth:`WatchBook.take` hands them on (the MLLM stage
publishes them), whoever made them: an answer, a command, the clock.
Answers without a ``condition_met`` (invalid, dropped, refused) and answers to a question
asked before the watch was set change nothing.

One watch per source at a time: one call answers one ``condition_met``, so setting a
watch on a source replaces the one it had (that one is ``removed``). With ``path`` the book
is saved (JSON, written to a temporary file and renamed) on every change and loaded when
it is made, so a restarted daemon keeps its watches and their states.
:func:`reconcile` brings a book (restored from its file) in line with the configuration's
``[[watches]]`` at start.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from stream_rt.config import WatchConfig
from stream_rt.graph.packets import MllmAnswer, WatchState

log = logging.getLogger(__name__)

PROMPT = "Standing condition {tag} to check: {condition} — say in condition_met whether it holds now."


@dataclass
class Watch:
    id: str
    source_id: str
    condition: str
    expires_at_ns: int | None = None  # wall clock
    confirm: int = 2
    recheck_s: float = 0.0  # while unmet, ask about the view this often even without salience
    state: str = "unmet"
    since_ns: int = 0  # wall clock of the last transition
    event_id: str = ""  # of the answer that made the last flip
    summary: str = ""
    streak: int = 0  # answers in a row that disagree with the state
    serial: int = 0  # which setting of a watch this is: an answer to an earlier one never counts
    origin: str = "command"  # or "config": set from [[watches]], removed when no longer configured
    entry: str = ""  # a configured watch: its [[watches]] entry, as set (see watch_entry)

    @property
    def prompt(self) -> str:
        return PROMPT.format(tag=f"'{self.id}' #{self.serial}", condition=self.condition)


def watch_entry(source_id: str, watch_id: str, condition: str, expires_s: float, confirm: int, recheck_s: float) -> str:
    """A [[watches]] entry as one string: a changed setting is another entry."""
    return json.dumps([source_id, watch_id, condition, expires_s, confirm, recheck_s])


def _restored(fields: dict[str, object]) -> Watch:
    """A watch as saved, its values checked (a file from elsewhere must not break the clock)."""
    watch = Watch(**fields)  # type: ignore[arg-type]
    kinds: dict[str, type | tuple[type, ...]] = {
        "id": str, "source_id": str, "condition": str, "confirm": int, "recheck_s": (int, float), "state": str,
        "since_ns": int, "event_id": str, "summary": str, "streak": int, "serial": int, "origin": str, "entry": str,
    }  # fmt: skip
    bad = [k for k, kind in kinds.items() if not isinstance(getattr(watch, k), kind)]
    if watch.expires_at_ns is not None and not isinstance(watch.expires_at_ns, int):
        bad.append("expires_at_ns")
    if bad or watch.state not in ("unmet", "met"):
        raise ValueError(f"watch {fields.get('id')!r}: bad {', '.join(bad) or 'state'}")
    return watch


class WatchBook:
    """The standing watches, one per source at most: set, removed, expired (on ``clock``,
    wall ns) and flipped by the model's answers; each transition waits as a
    :class:`WatchState` until :meth:`take` hands it on. ``path``: kept in that JSON file
    across restarts."""

    def __init__(self, path: Path | None = None, clock: Callable[[], int] = time.time_ns) -> None:
        self.path = path
        self._clock = clock
        self._watches: dict[str, Watch] = {}  # by source
        self._pending: list[WatchState] = []
        self._serial = 0
        # The [[watches]] entries whose watch expired: not set again while the configuration
        # holds them unchanged (forget_ended drops those it no longer holds).
        self._ended: list[str] = []
        if path is not None and path.exists():
            try:
                saved = json.loads(path.read_text())
                rows, ended = (saved, []) if isinstance(saved, list) else (saved["watches"], saved["ended"])
                self._watches = {w.source_id: w for w in map(_restored, rows)}
                self._ended = [e for e in ended if isinstance(e, str)]
                self._serial = max((w.serial for w in self._watches.values()), default=0)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                self._watches, self._ended = {}, []
                self._set_aside(path, exc)

    def _set_aside(self, path: Path, exc: Exception) -> None:
        """An unreadable file is kept beside for a person to look at, never overwritten; if
        it cannot be moved, nothing is saved."""
        aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            path.rename(aside)
            kept = f"kept it as {aside}"
        except OSError as move:
            self.path, kept = None, f"cannot move it ({move}): watches will not be saved"
        log.error("watches: cannot read %s (%s); starting with none, %s", path, exc, kept)

    def take(self) -> list[WatchState]:
        """The transitions made since the last call, oldest first."""
        taken, self._pending = self._pending, []
        return taken

    def of(self, source_id: str) -> Watch | None:
        return self._watches.get(source_id)

    def all(self) -> list[Watch]:
        return list(self._watches.values())

    def question(self, source_id: str, question: str) -> str:
        """``question``, with the source's standing condition if it has one."""
        watch = self._watches.get(source_id)
        return f"{question}\n{watch.prompt}" if watch is not None else question

    def set(
        self, source_id: str, watch_id: str, condition: str, expires_s: float = 0.0, confirm: int | None = None,
        recheck_s: float = 0.0, origin: str = "command",
    ) -> None:  # fmt: skip
        """Set the source's watch, replacing the one it had; the same watch set again (same
        id and condition: a configuration read at start, a command sent twice) keeps its
        state and takes the new expiry and pace. ``confirm`` ``None``: the watch's own, else 2."""
        old = self._watches.get(source_id)
        same = old is not None and (old.id, old.condition) == (watch_id, condition)
        confirm = confirm if confirm is not None else (old.confirm if old is not None and same else 2)
        if confirm < 1 or expires_s < 0 or recheck_s < 0:
            raise ValueError("a watch needs confirm >= 1, expires_s >= 0 and recheck_s >= 0")
        entry = watch_entry(source_id, watch_id, condition, expires_s, confirm, recheck_s)
        if origin == "config" and entry in self._ended:
            return  # it expired: the same [[watches]] entry read at a later start does not bring it back
        now = self._clock()
        expires = now + int(expires_s * 1e9) if expires_s else None
        if old is not None and same and old.confirm == confirm:
            if not (origin == "config" == old.origin and old.entry == entry):  # a restart keeps the first expiry
                old.expires_at_ns = expires
            old.recheck_s, old.origin, old.entry = recheck_s, origin, entry if origin == "config" else ""
            self._save()
            return
        if old is not None:
            self._drop(source_id, "removed", now)
        self._serial += 1
        watch = Watch(watch_id, source_id, condition, expires, confirm, recheck_s, since_ns=now, serial=self._serial,
                      origin=origin, entry=entry if origin == "config" else "")  # fmt: skip
        self._watches[source_id] = watch
        self._save()
        self._transition(watch, "set")

    def forget_ended(self, entries: Collection[str]) -> None:
        """Keep only the ended entries among ``entries`` (the configuration's now): one
        deleted from the config and added again later is a new watch."""
        kept = [e for e in self._ended if e in entries]
        if kept != self._ended:
            self._ended = kept
            self._save()

    def remove(self, source_id: str) -> None:
        if source_id not in self._watches:
            raise ValueError(f"source '{source_id}' has no watch")
        self._drop(source_id, "removed", self._clock())

    def observe(self, answer: MllmAnswer) -> None:
        """Count ``answer`` for its source's watch (a flip once ``confirm`` agree)."""
        watch = self._watches.get(answer.source_id)
        met = (answer.answer or {}).get("condition_met") if answer.status == "ok" else None
        if watch is None or not isinstance(met, bool) or watch.prompt not in answer.question:
            return
        if met == (watch.state == "met"):
            if watch.streak:
                watch.streak = 0
                self._save()
            return
        watch.streak += 1
        if watch.streak >= watch.confirm:
            watch.state, watch.streak, watch.since_ns = ("met" if met else "unmet"), 0, self._clock()
            watch.event_id, watch.summary = answer.event_id, str((answer.answer or {}).get("summary", ""))
            self._transition(watch, "answers")
        self._save()

    def expire(self) -> None:
        """End the watches whose time is up."""
        now = self._clock()
        for source in [w.source_id for w in self._watches.values() if w.expires_at_ns and w.expires_at_ns <= now]:
            self._drop(source, "expired", now)

    def _drop(self, source_id: str, state: str, now: int) -> None:
        watch = self._watches.pop(source_id)
        watch.state, watch.since_ns = state, now
        if state == "expired" and watch.entry:
            self._ended.append(watch.entry)
        self._save()
        self._transition(watch, state)

    def _transition(self, watch: Watch, reason: str) -> None:
        self._pending.append(WatchState(
            watch.source_id, -1, -1, self._clock(), watch.id, watch.state, watch.since_ns, watch.event_id,
            watch.summary, watch.condition, reason,
        ))  # fmt: skip

    def _save(self) -> None:
        if self.path is None:
            return
        staging = self.path.with_name(f".{self.path.name}.tmp")
        try:
            watches = [asdict(w) for w in self._watches.values()]
            staging.write_text(json.dumps({"watches": watches, "ended": self._ended}))
            os.replace(staging, self.path)
        except OSError as exc:  # the watch still works; only a restart would forget it
            log.warning("watches: cannot save %s: %s", self.path, exc)


def reconcile(book: WatchBook, configured: Sequence[WatchConfig]) -> None:
    """Bring ``book`` in line with the configuration's ``[[watches]]``: a configured watch
    whose entry was deleted since ends (``removed``), the expired entries no longer
    configured are forgotten (added again later, they are new watches), and every entry
    is set (a watch set again unchanged keeps its state and its first expiry; an expired
    entry still configured unchanged is not brought back)."""
    entries = {(w.source, w.id) for w in configured}
    for kept in book.all():
        if kept.origin == "config" and (kept.source_id, kept.id) not in entries:
            book.remove(kept.source_id)
    book.forget_ended({watch_entry(w.source, w.id, w.condition, w.expires_s, w.confirm, w.recheck_s)
                       for w in configured})  # fmt: skip
    for w in configured:
        book.set(w.source, w.id, w.condition, w.expires_s, w.confirm, w.recheck_s, origin="config")

"""Requests that wait for what was said: an ``update`` or ``end`` event of a transcribed
source is asked about with the words of its span, which are known only once the
transcriber has passed it, and an ``ask`` with what was just said
(:mod:`stream_rt.policies.heard` decides when, and sends the event again with its words).
The request is built when the event arrives — its pictures are the moment's — and held
until that copy of the event comes back; the two arrive on different edges, in either
order."""

from __future__ import annotations

from dataclasses import replace

from stream_rt.graph.packets import Event, MllmRequest
from stream_rt.mllm.prompt import heard_line

_Key = tuple[str, int]


MAX_EARLY = 256
"""The most events kept that came back before their request was built (a bound: one whose
request is never built, because building it failed, is forgotten oldest first)."""


class AwaitingWords:
    def __init__(self, sources: set[str] | None = None) -> None:
        self.sources: set[str] = sources if sources is not None else set()  # whose events come back with words
        self._held: dict[_Key, MllmRequest] = {}
        self._heard: dict[_Key, Event] = {}  # came back before their request was built
        self._closed = False  # no event comes back any more

    def waits(self, event: Event) -> bool:
        """Whether ``event``'s request waits for its words."""
        return event.call_model and event.type in ("update", "end", "ask") and event.source_id in self.sources

    def hold(self, event: Event, request: MllmRequest) -> MllmRequest | None:
        """``request`` with the words of ``event`` when they are known; else ``None`` (it is
        held until :meth:`heard` brings them)."""
        key = (event.event_id, event.seq)
        if key in self._heard:
            return _with_words(request, self._heard.pop(key))
        if self._closed:
            return request
        self._held[key] = request
        return None

    def heard(self, event: Event) -> MllmRequest | None:
        """``event`` came back with its words: its held request, now with them (``None``
        when it is not built yet, or never will be)."""
        key = (event.event_id, event.seq)
        if key in self._held:
            return _with_words(self._held.pop(key), event)
        if self.waits(event) and not self._closed:
            self._heard[key] = event
            while len(self._heard) > MAX_EARLY:
                del self._heard[next(iter(self._heard))]
        return None

    def close(self) -> list[MllmRequest]:
        """No event comes back any more: every held request, as it is; those built from now
        on are not held (they take the words that came back, if any)."""
        self._closed = True
        held, self._held = list(self._held.values()), {}
        return held


def _with_words(request: MllmRequest, event: Event) -> MllmRequest:
    line = heard_line(event)
    return replace(request, context=request.context + line) if line else request

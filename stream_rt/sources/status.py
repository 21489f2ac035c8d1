"""Sources that connect to something report ``online`` / ``offline`` the same way, and
how many frames per second they deliver."""

from __future__ import annotations

from collections import deque
from typing import Literal

from stream_rt.graph.node import Context, Source
from stream_rt.graph.packets import SourceStatus

State = Literal["connecting", "online", "offline", "ended"]


class FrameRate:
    """Frames per second over the last ``window_s`` whole seconds (one counter per
    second, so a tick costs the same at 10 or 3,000 fps)."""

    def __init__(self, window_s: int = 5) -> None:
        self.window_s = window_s
        self._buckets: deque[list[int]] = deque()  # [second, frames]
        self._first_s: int | None = None

    def tick(self, now_ns: int) -> None:
        second = now_ns // 1_000_000_000
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += 1
            return
        if self._first_s is None:
            self._first_s = second
        self._buckets.append([second, 1])
        while self._buckets[0][0] < second - self.window_s:
            self._buckets.popleft()

    def rate(self, now_ns: int) -> float:
        """Frames per second in the whole seconds before ``now_ns``; the first second,
        which began before the first frame, counts only until a full one follows."""
        if self._first_s is None:
            return 0.0
        second = now_ns // 1_000_000_000
        first = self._first_s + 1 if second > self._first_s + 1 else self._first_s
        start = max(second - self.window_s, first)
        if second <= start:
            return 0.0
        frames = sum(n for s, n in self._buckets if start <= s < second)
        return frames / (second - start)


class StatusSource(Source):
    """A source with a ``status`` output port and a ``state`` (``connecting`` until the
    first connection succeeds or fails). Each change of state is emitted once, as a
    :class:`SourceStatus` whose ``detail`` says why. Subclasses call
    ``self.frame_rate.tick(now_ns)`` for each video frame they emit, say which kinds of
    media they may produce (``has_video``, ``has_audio``), which kinds the current
    connection delivers (``streams``, sent with ``online``), what they are connected to
    (``description``) and, for recordings, how far they are (``position_s`` of
    ``duration_s``; ``cut_short`` says where one ended before its declared end).
    ``state_since_ns`` is when the state last changed (the graph clock's
    ``now_ns()``; a source that never connected counts from its start). A source whose
    stream ended for good (a file) is ``ended`` (:meth:`end`): not online, and not a
    failure either."""

    state: State = "connecting"

    def __init__(self, name: str, *, has_video: bool, has_audio: bool) -> None:
        super().__init__(name)
        self.has_video, self.has_audio = has_video, has_audio
        self.streams: tuple[str, ...] = tuple(k for k, on in (("video", has_video), ("audio", has_audio)) if on)
        self.state_since_ns: int | None = None
        self.frame_rate = FrameRate()
        self.description = ""
        self.position_s = 0.0
        self.duration_s: float | None = None
        self.cut_short = ""  # a recording that ended before its declared end: where, of how long

    async def start(self, ctx: Context) -> None:
        if self.state_since_ns is None:
            self.state_since_ns = ctx.clock.now_ns()

    async def set_state(self, ctx: Context, state: Literal["online", "offline"], detail: str) -> None:
        if self.state == state:
            return
        if not (self.state == "connecting" and state == "offline"):  # never connected: down since the start
            self.state_since_ns = ctx.clock.now_ns()
        self.state = state
        streams = self.streams if state == "online" else ()
        await ctx.emit("status", SourceStatus(self.name, -1, -1, ctx.clock.wall_ns(), state, detail, streams))

    def end(self, ctx: Context) -> None:
        """The stream ended for good (end of file): the graph sends its end of stream."""
        self.state, self.state_since_ns = "ended", ctx.clock.now_ns()

    def health(self, now_ns: int, grace_ns: int) -> str | None:
        """``None`` while online or ended (or down for less than ``grace_ns``); else one line
        saying for how long the source has been ``offline`` or, never connected,
        ``connecting``."""
        if self.state in ("online", "ended") or self.state_since_ns is None or now_ns - self.state_since_ns < grace_ns:
            return None
        return f"{self.name} ({self.state} for {(now_ns - self.state_since_ns) / 1e9:.0f} s)"

    def gauges(self, now_ns: int) -> dict[str, float]:
        return {"fps": round(self.frame_rate.rate(now_ns), 2)}

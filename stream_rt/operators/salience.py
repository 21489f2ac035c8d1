"""Salience fusion: visual change and audio features become one score per time step, by
media time.

Each modality is scored 0..1 on its own:

- ``visual``: the share of the frame in changed regions, relative to ``visual_full``
  (that share or more scores 1);
- ``speech``: the highest Silero VAD probability in the step;
- ``onset``: the strongest spectral-flux onset in the step, relative to ``onset_full``
  standard deviations;
- ``loudness``: the highest level above the noise floor in the step, relative to
  ``loudness_full_db``.

The score is the largest weighted component (any modality alone can make a scene
salient); all components are kept for explanation.

**Steps follow media time, never arrival order.** A time step is a video frame (its
change map): the step at media time ``t`` holds the audio windows that start before
``t``. Audio and video reach this node by different paths and may be skewed (a live
camera's audio arriving late, a busier analyser), so per source the node keeps the steps
and the audio it has not fused yet, and fuses a step once the audio has passed ``t`` (a
window starting at ``t`` or later has arrived).

A modality is waited for only while it is expected: the pipeline says which modalities
are wired for a source (:meth:`SalienceFusion.expect`), its
:class:`~stream_rt.graph.packets.SourceStatus` says which streams it delivers, and a
modality seen once is expected from then on — until its stream ends
(:class:`~stream_rt.graph.packets.StreamEnded`), or until nothing of it has arrived for
``max_lateness_s`` on the graph's clock while the other modality goes on: then it is
**stalled** (counted once, ``stalled_audio`` / ``stalled_video``) and not waited for
until it arrives again. Waiting is bounded in media time too: a step is fused without its
audio once the video has run ``max_lateness_s`` past it (``late_steps``); audio arriving
for time already fused joins the next step (``late_audio``).

A source with no video, or whose video is stalled, ended, or more than
``max_lateness_s`` of media time behind its audio, makes steps from its audio: each holds
``AUDIO_STEP_NS`` (100 ms) of it (in whole 32 ms windows) and is stamped at the end of that audio,
with the source's last frame. A change map that arrives for time already covered is not
stamped anew: its visual score and regions join the next step (``late_video``). Emitted
times are strictly increasing per source.

``offline`` on ``status`` fuses everything pending for that source (nothing waits for a
dead stream) and passes the status on, after the source's last steps; a source's
:class:`StreamEnded` is passed on once each of its modalities has ended, after its last
steps, so the trigger can close it while other sources go on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from stream_rt.config import SalienceConfig
from stream_rt.config.perception import DEFAULT_WEIGHTS
from stream_rt.graph.node import Context, Node
from stream_rt.graph.packets import (
    AudioFeatures,
    Box,
    ChangeMap,
    DetectedObject,
    EndOfStream,
    Packet,
    Salience,
    SourceStatus,
    StreamEnded,
    VideoFrame,
)
from stream_rt.operators.audio import WINDOW_NS

AUDIO_STEP_NS = 100_000_000
"""Media time of audio in a step made without video (in whole 32 ms windows)."""

Kind = Literal["video", "audio"]


@dataclass
class _Modality:
    wired: bool | None = None  # connected for this source (None: nobody said)
    reached_ns: int | None = None  # media time it has reached (its last packet)
    arrived_ns: int | None = None  # when that packet arrived, on the graph's clock
    stalled: bool = False
    ended: bool = False


@dataclass
class _Source:
    source_id: str
    p: SalienceConfig
    video: _Modality = field(default_factory=_Modality)
    audio: _Modality = field(default_factory=_Modality)
    streams: tuple[str, ...] | None = None  # what the source says it delivers, if it said
    started_ns: int | None = None  # when its first packet arrived, on the graph's clock
    steps: deque[ChangeMap] = field(default_factory=deque)  # video steps waiting for audio
    sound: deque[AudioFeatures] = field(default_factory=deque)  # audio not fused yet, in media-time order
    emitted_ns: int | None = None  # time of the last step emitted
    frame: VideoFrame | None = field(default=None, repr=False)  # the last frame fused
    late_visual: float = 0.0  # of change maps that arrived for time already covered
    late_regions: tuple[Box, ...] = ()
    late_zones: tuple[str, ...] = ()
    objects: tuple[DetectedObject, ...] = ()  # of the last change map
    end_reason: str = ""  # why its streams ended, once one has
    closed: bool = False  # its StreamEnded was passed on

    def modality(self, kind: Kind) -> _Modality:
        return self.video if kind == "video" else self.audio

    @property
    def max_lateness_ns(self) -> int:
        return int(self.p.max_lateness_s * 1e9)

    @property
    def weights(self) -> dict[str, float]:
        """Each component's weight: the source's, else the default."""
        return {**DEFAULT_WEIGHTS, **{str(k): w for k, w in self.p.weights.items()}}


class SalienceFusion(Node):
    """Change maps (``changes``), audio features (``audio``) and source status (``status``)
    in, one :class:`Salience` per time step and source out on ``salience``, fused by media
    time (never arrival order): a step waits for both modalities of its source, at most
    ``max_lateness_s`` of wall time. The score is the largest weighted component, 0..1; the
    arguments are the defaults of every source (see the module docstring for each)."""

    inputs = {"changes": (ChangeMap,), "audio": (AudioFeatures,), "status": (SourceStatus,)}
    outputs = {"salience": (Salience,)}

    def __init__(self, name: str, settings: SalienceConfig | None = None) -> None:
        """``settings``: every source's, unless :meth:`configure` gives it its own."""
        super().__init__(name)
        self.defaults = settings or SalienceConfig()
        self._sources: dict[str, _Source] = {}
        self._ended: set[str] = set()  # input ports whose every stream has ended

    def configure(self, source_id: str, settings: SalienceConfig) -> None:
        """Give ``source_id`` settings of its own (its effective ``[salience]`` section)."""
        self._of(source_id).p = settings

    def settings(self, source_id: str) -> SalienceConfig:
        return self._of(source_id).p

    def expect(self, source_id: str, *, video: bool, audio: bool) -> None:
        """Say which modalities are wired for ``source_id`` (the pipeline does): one that is
        not is never waited for."""
        state = self._of(source_id)
        state.video.wired, state.audio.wired = video, audio

    def _of(self, source_id: str) -> _Source:
        state = self._sources.get(source_id)
        if state is None:
            state = self._sources[source_id] = _Source(source_id, self.defaults)
        return state

    async def process(self, packet: Packet, ctx: Context) -> None:
        state = self._of(packet.source_id)
        now = ctx.clock.now_ns()
        if state.started_ns is None:
            state.started_ns = now
        if isinstance(packet, ChangeMap):
            self._arrived(state, "video", packet.pts_ns, now)
            if state.emitted_ns is not None and packet.pts_ns <= state.emitted_ns:
                # Its time was covered by audio steps: it joins the next step.
                ctx.count("late_video", source=state.source_id)
                state.late_visual = max(state.late_visual, self._visual(state, packet))
                state.late_regions = packet.regions or state.late_regions
                state.late_zones = tuple(dict.fromkeys(state.late_zones + packet.zones))
                state.objects = packet.objects
                state.frame = packet.frame
            else:
                state.steps.append(packet)
        elif isinstance(packet, AudioFeatures):
            self._arrived(state, "audio", packet.pts_ns, now)
            if state.emitted_ns is not None and packet.pts_ns < state.emitted_ns:
                ctx.count("late_audio", source=state.source_id)
            state.sound.append(packet)
        await self._release(state, ctx)

    def _arrived(self, state: _Source, kind: Kind, pts_ns: int, now: int) -> None:
        m = state.modality(kind)
        m.reached_ns, m.arrived_ns, m.stalled = pts_ns, now, False

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        state = self._of(packet.source_id)
        if isinstance(packet, SourceStatus):
            if packet.state == "online":
                state.streams = packet.streams or None
            else:
                await self._release(state, ctx, flush=True)
            await ctx.emit("salience", packet)  # after the source's last steps
        elif isinstance(packet, StreamEnded) and ctx.port in ("changes", "audio"):
            state.modality("video" if ctx.port == "changes" else "audio").ended = True
            state.end_reason = packet.reason
            await self._release(state, ctx, flush=self._done(state))
            if self._done(state):
                await self._close(state, ctx)
        elif isinstance(packet, EndOfStream):
            if ctx.port in ("changes", "audio"):
                self._ended.add(ctx.port)
                for source in self._sources.values():
                    await self._release(source, ctx, flush=self._done(source))
            elif not (state.video.wired or state.audio.wired):  # nothing of it is fused: its own end is all there is
                state.end_reason = packet.reason
                await self._close(state, ctx)

    def _done(self, state: _Source) -> bool:
        return not self._expects(state, "video") and not self._expects(state, "audio")

    async def _close(self, state: _Source, ctx: Context) -> None:
        """Pass the source's end on, once, after its last steps."""
        if not state.closed:
            state.closed = True
            await ctx.emit("salience", StreamEnded(state.source_id, -1, -1, ctx.clock.wall_ns(), state.end_reason))

    def _expects(self, state: _Source, kind: Kind) -> bool:
        """Whether ``kind`` may still come for this source (so steps wait for it)."""
        m = state.modality(kind)
        if m.ended or m.wired is False or ("changes" if kind == "video" else "audio") in self._ended:
            return False
        if state.streams is not None:
            return kind in state.streams or m.reached_ns is not None
        return m.reached_ns is not None or m.wired is True

    def _waits_for(self, state: _Source, kind: Kind, ctx: Context) -> bool:
        """Whether to wait for ``kind``: expected, and not stalled (nothing arrived for
        ``max_lateness_s`` on the clock while the other modality went on)."""
        if not self._expects(state, kind):
            return False
        m = state.modality(kind)
        if m.stalled:
            return False
        since = m.arrived_ns if m.arrived_ns is not None else state.started_ns
        if since is not None and ctx.clock.now_ns() - since >= state.max_lateness_ns:
            m.stalled = True
            ctx.count(f"stalled_{kind}", source=state.source_id)
            return False
        return True

    async def _release(self, state: _Source, ctx: Context, flush: bool = False) -> None:
        """Fuse every step of ``state`` that is due (all of them with ``flush``)."""
        while state.steps:
            t = state.steps[0].pts_ns
            passed = state.audio.reached_ns is not None and state.audio.reached_ns >= t
            if not (flush or passed) and self._waits_for(state, "audio", ctx):
                assert state.video.reached_ns is not None
                if state.video.reached_ns - t < state.max_lateness_ns:
                    return
                ctx.count("late_steps", source=state.source_id)
            step = state.steps.popleft()
            await self._emit(state, step, self._take_sound(state, before_ns=t), ctx)
        # No video step waits: the audio makes its own steps where there is no video to wait for.
        while state.sound:
            if not flush and self._waits_for(state, "video", ctx):
                reached = state.video.reached_ns if state.video.reached_ns is not None else state.sound[0].pts_ns
                assert state.audio.reached_ns is not None
                if state.audio.reached_ns - reached < state.max_lateness_ns:
                    return
            start = state.sound[0].pts_ns
            closing = next((a for a in state.sound if a.pts_ns + WINDOW_NS - start >= AUDIO_STEP_NS), None)
            if closing is None:
                if not flush:
                    return
                closing = state.sound[-1]
            taken = self._take_sound(state, before_ns=closing.pts_ns + 1)
            await self._emit(state, None, taken, ctx, at_ns=closing.pts_ns + WINDOW_NS)

    def _take_sound(self, state: _Source, before_ns: int) -> list[AudioFeatures]:
        taken = []
        while state.sound and state.sound[0].pts_ns < before_ns:
            taken.append(state.sound.popleft())
        return taken

    @staticmethod
    def _visual(state: _Source, changes: ChangeMap) -> float:
        area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in changes.regions)
        return min(1.0, area / (changes.frame.width * changes.frame.height) / state.p.visual_full)

    async def _emit(
        self, state: _Source, step: ChangeMap | None, audio: list[AudioFeatures], ctx: Context, at_ns: int = 0
    ) -> None:
        """One step: a change map with the audio before it, or (``step`` None) audio alone,
        stamped ``at_ns``."""
        p = state.p
        visual, regions, zones = state.late_visual, state.late_regions, state.late_zones
        if step is not None:
            visual, regions = max(visual, self._visual(state, step)), step.regions or regions
            zones = tuple(dict.fromkeys(zones + step.zones))
            state.frame, state.objects, at_ns = step.frame, step.objects, step.pts_ns
        state.late_visual, state.late_regions, state.late_zones = 0.0, (), ()
        components = {
            "visual": visual,
            "speech": max((a.speech for a in audio if a.speech is not None), default=0.0),
            "onset": max((min(1.0, a.onset / p.onset_full) for a in audio), default=0.0),
            "loudness": max(
                (min(1.0, max(0.0, (a.level_dbfs - a.floor_dbfs) / p.loudness_full_db)) for a in audio),
                default=0.0,
            ),
        }
        weights = state.weights
        score = min(1.0, max(weights[name] * value for name, value in components.items()))
        pts = at_ns if state.emitted_ns is None else max(at_ns, state.emitted_ns + 1)
        state.emitted_ns = pts
        source = step if step is not None else audio[-1]
        salience = Salience(
            source.source_id, source.seq, pts, source.wall_ns, score, components, regions, state.frame, zones,
            state.objects,
        )  # fmt: skip
        await ctx.emit("salience", salience)

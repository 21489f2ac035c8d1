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
and audio it has not fused yet and fuses a step once the audio has passed ``t`` (a
window starting at ``t`` or later has arrived). A modality is waited for only while it
is expected: the pipeline says which modalities are wired for a source (:meth:`expect`),
each :class:`~stream_rt.graph.packets.SourceStatus` says which streams it delivers, and
a modality that has been seen is expected from then on. Waiting is bounded: a step is
fused without the audio once the video has run ``max_lateness_s`` of media time past it
(counted as ``late_steps``); audio that arrives for time already fused joins the next
step (``late_audio``). A source with no video, or whose video has stopped for
``max_lateness_s`` while its audio goes on, makes a step every ``audio_step_s`` of audio,
carrying its last frame. Emitted times are strictly increasing per source.

Status packets arrive on ``status``: ``offline`` fuses everything pending for that source
(nothing waits for a dead stream), then the status is passed on to ``salience`` so the
trigger sees it after the source's last steps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from stream_rt.graph.node import Context, Node
from stream_rt.graph.packets import AudioFeatures, ChangeMap, EndOfStream, Packet, Salience, SourceStatus, VideoFrame

DEFAULT_WEIGHTS = {"visual": 1.0, "speech": 1.0, "onset": 0.6, "loudness": 0.5}


@dataclass
class _Source:
    steps: deque[ChangeMap] = field(default_factory=deque)  # video steps waiting for audio
    audio: deque[AudioFeatures] = field(default_factory=deque)  # audio not fused yet, in media-time order
    video_ns: int | None = None  # media time the video has reached (last change map)
    audio_ns: int | None = None  # media time the audio has reached (last window's start)
    emitted_ns: int | None = None  # time of the last step emitted
    frame: VideoFrame | None = field(default=None, repr=False)
    wired: tuple[bool, bool] | None = None  # (video, audio) connected for this source, if known
    streams: tuple[str, ...] | None = None  # what the source says it delivers, if it said


class SalienceFusion(Node):
    inputs = {"changes": (ChangeMap,), "audio": (AudioFeatures,), "status": (SourceStatus,)}
    outputs = {"salience": (Salience,)}

    def __init__(
        self,
        name: str,
        *,
        visual_full: float = 0.02,
        onset_full: float = 8.0,
        loudness_full_db: float = 30.0,
        weights: dict[str, float] | None = None,
        audio_step_s: float = 0.1,
        max_lateness_s: float = 1.0,
    ) -> None:
        super().__init__(name)
        self.visual_full = visual_full
        self.onset_full = onset_full
        self.loudness_full_db = loudness_full_db
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.audio_step_ns = int(audio_step_s * 1e9)
        self.max_lateness_ns = int(max_lateness_s * 1e9)
        self._sources: dict[str, _Source] = {}
        self._ended: set[str] = set()  # input ports whose stream has ended

    def expect(self, source_id: str, *, video: bool, audio: bool) -> None:
        """Say which modalities are wired for ``source_id`` (the pipeline does): one that is
        not is never waited for."""
        self._of(source_id).wired = (video, audio)

    def _of(self, source_id: str) -> _Source:
        state = self._sources.get(source_id)
        if state is None:
            state = self._sources[source_id] = _Source()
        return state

    async def process(self, packet: Packet, ctx: Context) -> None:
        state = self._of(packet.source_id)
        if isinstance(packet, ChangeMap):
            state.steps.append(packet)
            state.video_ns = packet.pts_ns
        elif isinstance(packet, AudioFeatures):
            if state.emitted_ns is not None and packet.pts_ns <= state.emitted_ns:
                ctx.count("late_audio")
            state.audio.append(packet)
            state.audio_ns = packet.pts_ns
        await self._release(state, ctx)

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, SourceStatus):
            state = self._of(packet.source_id)
            if packet.state == "online":
                state.streams = packet.streams or None
            else:
                await self._release(state, ctx, flush=True)
            await ctx.emit("salience", packet)  # after the source's last steps
        elif isinstance(packet, EndOfStream) and ctx.port in ("changes", "audio"):
            self._ended.add(ctx.port)
            for state in self._sources.values():
                done = not self._expects(state, "video") and not self._expects(state, "audio")
                await self._release(state, ctx, flush=done)

    def _expects(self, state: _Source, kind: str) -> bool:
        port = "changes" if kind == "video" else "audio"
        if port in self._ended:
            return False
        seen = (state.video_ns if kind == "video" else state.audio_ns) is not None
        if state.wired is not None and not state.wired[kind == "audio"]:
            return False
        if state.streams is not None:
            return kind in state.streams or seen
        return seen or state.wired is not None

    async def _release(self, state: _Source, ctx: Context, flush: bool = False) -> None:
        """Fuse every step of ``state`` that is due (all of them with ``flush``)."""
        while state.steps:
            t = state.steps[0].pts_ns
            audio_passed = state.audio_ns is not None and state.audio_ns >= t
            if not (flush or audio_passed or not self._expects(state, "audio")):
                assert state.video_ns is not None
                if state.video_ns - t < self.max_lateness_ns:
                    return
                ctx.count("late_steps")
            step = state.steps.popleft()
            await self._emit(state, step, self._take_audio(state, before_ns=t), ctx)
        # No video step waits: audio makes its own steps where there is no video to wait for.
        while state.audio:
            if self._expects(state, "video") and not flush:
                assert state.audio_ns is not None
                reached = state.video_ns if state.video_ns is not None else state.audio[0].pts_ns
                if state.audio_ns - reached < self.max_lateness_ns:
                    return
            start = state.audio[0].pts_ns
            closing = next((a for a in state.audio if a.pts_ns - start >= self.audio_step_ns), None)
            if closing is None:
                if not flush:
                    return
                closing = state.audio[-1]
            await self._emit(state, closing, self._take_audio(state, before_ns=closing.pts_ns + 1), ctx)

    def _take_audio(self, state: _Source, before_ns: int) -> list[AudioFeatures]:
        taken = []
        while state.audio and state.audio[0].pts_ns < before_ns:
            taken.append(state.audio.popleft())
        return taken

    async def _emit(
        self, state: _Source, step: ChangeMap | AudioFeatures, audio: list[AudioFeatures], ctx: Context
    ) -> None:
        visual = 0.0
        regions: tuple[tuple[int, int, int, int], ...] = ()
        frame = state.frame
        if isinstance(step, ChangeMap):
            regions, frame = step.regions, step.frame
            state.frame = frame
            area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in regions)
            visual = min(1.0, area / (frame.width * frame.height) / self.visual_full)
        components = {
            "visual": visual,
            "speech": max((a.speech for a in audio if a.speech is not None), default=0.0),
            "onset": max((min(1.0, a.onset / self.onset_full) for a in audio), default=0.0),
            "loudness": max(
                (min(1.0, max(0.0, (a.level_dbfs - a.floor_dbfs) / self.loudness_full_db)) for a in audio),
                default=0.0,
            ),
        }
        score = min(1.0, max(self.weights[name] * value for name, value in components.items()))
        pts = step.pts_ns if state.emitted_ns is None else max(step.pts_ns, state.emitted_ns + 1)
        state.emitted_ns = pts
        salience = Salience(step.source_id, step.seq, pts, step.wall_ns, score, components, regions, frame)
        await ctx.emit("salience", salience)

"""Transcription: only the speech the VAD found is transcribed, in a process of its own,
and every word is stamped with media time.

The node reads two edges of each source: its audio (the samples) and the audio
analyser's features (the VAD's speech probability per 32 ms window). A stretch of speech
begins at the first window at ``speech_threshold`` or above and ends after
``end_silence_s`` without one (or after ``max_stretch_s``, the rest being the next
stretch). Once the audio edge has brought the stretch's samples (with ``pad_s`` either
side) it goes to the recogniser; stretches are recognised one at a time, in order, in a
process of the node's own (PocketSphinx holds the GIL while it decodes: on a thread it
would stop the event loop, and perception with it), so the loop never waits for them.
The cost is bounded however much is said: on a live source, speech waiting for the
recogniser beyond ``max_backlog_s`` is skipped, oldest first, and counted; a recorded file
waits instead (its replay slows down), so a replay's transcripts do not depend on how
fast it runs.

Out: a :class:`~stream_rt.graph.packets.Transcript` per stretch on ``transcripts`` (for
sinks), and the same with :class:`~stream_rt.graph.packets.TranscribedUntil` marks on
``words`` (for what waits for the words of a span): a mark says every stretch that began
before it has been sent. A source's last mark, once its audio and features ended, is
:data:`~stream_rt.graph.packets.ALL_TRANSCRIBED_NS`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from stream_rt.config import TranscriptionConfig
from stream_rt.graph.helper_process import helper_process, kill
from stream_rt.graph.node import Context, Node
from stream_rt.graph.packets import (
    ALL_TRANSCRIBED_NS,
    AUDIO_SAMPLE_RATE,
    AudioChunk,
    AudioFeatures,
    EndOfStream,
    Packet,
    StreamEnded,
    TranscribedUntil,
    Transcript,
    Word,
)
from stream_rt.operators.audio import WINDOW_NS
from stream_rt.operators.recognizers import RecognizedWord, Recognizer, check_recognizer, load_recognizer

log = logging.getLogger("stream_rt.transcription")

NS = 1_000_000_000
MARK_EVERY_NS = 250_000_000
"""How far a source's mark moves before it is sent again (between stretches)."""
SKIP_WARNING_EVERY_NS = 60 * NS
"""Skipped speech is logged at most once a minute of media time per source (always counted)."""
HUNG_AFTER_S = 30.0
"""A stretch not recognised after this, plus :data:`HUNG_PER_SPEECH_S` per second of it, is
given up (counted as a transcription error) and the recogniser's process started again."""
HUNG_PER_SPEECH_S = 5.0


@dataclass
class _Stretch:
    start_ns: int
    end_ns: int
    cut_start: bool = False  # begins where a stretch cut at max_stretch_s ended: not padded there
    cut_end: bool = False
    samples: npt.NDArray[np.float32] | None = None
    samples_start_ns: int = 0  # media time of the first sample
    turn: int = 0  # the order stretches of all sources go to the recogniser in: as they are ready

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / NS


@dataclass
class _Source:
    source_id: str
    settings: TranscriptionConfig
    live: bool
    chunks: deque[AudioChunk] = field(default_factory=deque)
    audio_until_ns: int = -1  # end of the newest audio received
    heard_until_ns: int = -1  # end of the newest VAD window received
    open_start_ns: int | None = None  # the stretch being spoken
    open_cut: bool = False  # it goes on from a stretch cut at max_stretch_s
    last_speech_ns: int = -1  # end of its latest speech window
    closed: deque[_Stretch] = field(default_factory=deque)  # spoken, waiting for their audio
    queued: deque[_Stretch] = field(default_factory=deque)  # waiting for the recogniser (or on it)
    audio_ended: bool = False
    features_ended: bool = False
    marked_ns: int = -1
    warned_ns: int = -(2**62)  # media time of the last skip logged
    seq: int = 0


class Transcriber(Node):
    """Audio ``audio`` (:class:`AudioChunk`) and the analyser's ``features``
    (:class:`AudioFeatures`) in; :class:`Transcript` out on ``transcripts``, and with
    :class:`TranscribedUntil` marks on ``words`` (see the module docstring). Each source is
    set up with :meth:`configure` (its effective ``[transcription]`` section); its
    recogniser is loaded there once, so one that cannot load fails the build in one line."""

    inputs = {"audio": (AudioChunk,), "features": (AudioFeatures,)}
    outputs = {"transcripts": (Transcript,), "words": (Transcript, TranscribedUntil)}

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._sources: dict[str, _Source] = {}
        self._settings: dict[str, tuple[TranscriptionConfig, bool]] = {}
        self._progress = asyncio.Event()  # set as each stretch is done
        self._checked: set[tuple[object, ...]] = set()
        self._executor: ProcessPoolExecutor | None = None
        self._work = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._turns = 0

    def configure(self, source_id: str, settings: TranscriptionConfig, live: bool) -> None:
        """Transcribe ``source_id`` with ``settings``; ``live``: its backlog is bounded by
        skipping speech (else by waiting: a recorded file)."""
        if _key(settings) not in self._checked:
            check_recognizer(settings)  # loaded in the recogniser's process only
            self._checked.add(_key(settings))
        self._settings[source_id] = (settings, live)

    async def start(self, ctx: Context) -> None:
        if any(live for _, live in self._settings.values()):  # a daemon: loaded before the first words
            self._start_recognizer()
        self._worker = asyncio.create_task(self._recognize_in_turn(ctx), name=f"stream_rt:{self.name}:recognize")

    def _start_recognizer(self) -> ProcessPoolExecutor:
        """The recogniser's process, with every configured recogniser loaded first."""
        self._executor = helper_process()
        for settings in {_key(s): s for s, _ in self._settings.values()}.values():
            warm_up = self._executor.submit(_recognize, settings, np.zeros(1600, np.float32))
            warm_up.add_done_callback(_log_failed_warm_up)
        return self._executor

    async def stop(self, ctx: Context) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def process(self, packet: Packet, ctx: Context) -> None:
        source = self._source(packet.source_id)
        if source is None:
            return
        if isinstance(packet, AudioChunk):
            source.chunks.append(packet)
            source.audio_until_ns = packet.pts_ns + packet.duration_ns
        elif isinstance(packet, AudioFeatures):
            self._segment(source, packet)
        self._dispatch(source, ctx)
        await self._mark(source, ctx)
        while not source.live and _waiting_s(source) > source.settings.max_backlog_s:  # a file waits its turn
            self._progress.clear()
            await self._progress.wait()

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        source = self._sources.get(packet.source_id)
        if source is None:
            return
        if isinstance(packet, StreamEnded):  # the analyser's last window of the source has come
            source.features_ended = True
            self._close(source, source.last_speech_ns)
        elif isinstance(packet, EndOfStream) and ctx.port == "audio":
            source.audio_ended = True
        self._dispatch(source, ctx)
        if source.audio_ended and source.features_ended:
            while source.queued:  # everything said is sent before the source's end
                self._progress.clear()
                await self._progress.wait()
            await ctx.emit(
                "words", TranscribedUntil(packet.source_id, source.seq, ALL_TRANSCRIBED_NS, ctx.clock.wall_ns())
            )
            del self._sources[packet.source_id]

    def _source(self, source_id: str) -> _Source | None:
        source = self._sources.get(source_id)
        if source is None and source_id in self._settings:
            source = self._sources[source_id] = _Source(source_id, *self._settings[source_id])
        return source

    def _segment(self, source: _Source, features: AudioFeatures) -> None:
        p = source.settings
        end = features.pts_ns + WINDOW_NS
        if source.open_start_ns is not None and features.pts_ns - source.heard_until_ns >= p.end_silence_s * NS:
            self._close(source, source.last_speech_ns)  # the audio broke off (a live source's outage): no speech
        source.heard_until_ns = end
        if features.speech is not None and features.speech >= p.speech_threshold:
            if source.open_start_ns is None:
                source.open_start_ns = features.pts_ns
                source.open_cut = source.last_speech_ns == features.pts_ns  # speech right before: a cut
            source.last_speech_ns = end
            if end - source.open_start_ns >= p.max_stretch_s * NS:
                self._close(source, end, cut=True)
        elif source.open_start_ns is not None and end - source.last_speech_ns >= p.end_silence_s * NS:
            self._close(source, source.last_speech_ns)

    def _close(self, source: _Source, end_ns: int, cut: bool = False) -> None:
        if source.open_start_ns is not None:
            source.closed.append(_Stretch(source.open_start_ns, end_ns, source.open_cut, cut))
            source.open_start_ns = None

    def _dispatch(self, source: _Source, ctx: Context) -> None:
        """Stretches whose audio is in go to the recogniser; old audio is let go."""
        pad = int(source.settings.pad_s * NS)
        while source.closed and (source.audio_ended or source.audio_until_ns >= source.closed[0].end_ns + pad):
            stretch = source.closed.popleft()  # padded where speech began or ended, not where it was cut
            stretch.samples, stretch.samples_start_ns = _cut(
                source.chunks, stretch.start_ns - (0 if stretch.cut_start else pad),
                stretch.end_ns + (0 if stretch.cut_end else pad),
            )  # fmt: skip
            stretch.turn = self._turns = self._turns + 1
            source.queued.append(stretch)
            if source.live:
                self._skip_backlog(source, ctx)
            self._work.set()
        keep_from = (
            min(
                [source.heard_until_ns]
                + [s.start_ns for s in source.closed]
                + ([source.open_start_ns] if source.open_start_ns is not None else [])
            )
            - pad
            - NS
        )  # a second more: the audio edge may run behind the features
        while source.chunks and source.chunks[0].pts_ns + source.chunks[0].duration_ns < keep_from:
            source.chunks.popleft()

    def _skip_backlog(self, source: _Source, ctx: Context) -> None:
        while _waiting_s(source) > source.settings.max_backlog_s:
            skipped = source.queued[1]  # the first may be on the recogniser already
            source.queued.remove(skipped)
            ctx.count("speech_skipped_ms", round(skipped.seconds * 1000), source=source.source_id)
            if skipped.start_ns - source.warned_ns >= SKIP_WARNING_EVERY_NS:
                source.warned_ns = skipped.start_ns
                log.warning(
                    "transcription of '%s' cannot keep up: speech at %.1f s skipped (more than %g s waiting; "
                    "counted as speech_skipped_ms)", source.source_id, skipped.start_ns / NS,
                    source.settings.max_backlog_s,
                )  # fmt: skip

    def _done_until(self, source: _Source) -> int:
        """Every stretch that began before this has been sent."""
        pending = [s.start_ns for s in (*source.closed, *source.queued)]
        if source.open_start_ns is not None:
            pending.append(source.open_start_ns)
        return min([source.heard_until_ns, *pending])

    async def _mark(self, source: _Source, ctx: Context, force: bool = False) -> None:
        until = self._done_until(source)
        if until > source.marked_ns and (force or until - source.marked_ns >= MARK_EVERY_NS):
            source.marked_ns = until
            await ctx.emit("words", TranscribedUntil(source.source_id, source.seq, until, ctx.clock.wall_ns()))

    async def _recognize_in_turn(self, ctx: Context) -> None:
        """The recogniser's loop: queued stretches of all sources in the order they were
        ready, one at a time."""
        while True:
            await self._work.wait()
            self._work.clear()
            while True:
                ready = [s for s in self._sources.values() if s.queued]
                if not ready:
                    break
                source = min(ready, key=lambda s: s.queued[0].turn)
                stretch = source.queued[0]
                words = await self._recognize(source, stretch, ctx)
                if words is not None:
                    origin = stretch.samples_start_ns
                    transcript = Transcript(
                        source.source_id, source.seq, stretch.start_ns, ctx.clock.wall_ns(), stretch.end_ns,
                        tuple(Word(text, origin + int(a * NS), origin + int(b * NS), p) for text, a, b, p in words),
                        source.settings.engine, source.settings.language,
                    )  # fmt: skip
                    source.seq += 1
                    if transcript.words:  # sinks hear of speech with words only
                        await ctx.emit("transcripts", transcript)
                    await ctx.emit("words", transcript)
                if source.queued and source.queued[0] is stretch:  # only now: no mark may pass it before
                    source.queued.popleft()
                await self._mark(source, ctx, force=True)
                self._progress.set()

    async def _recognize(self, source: _Source, stretch: _Stretch, ctx: Context) -> list[RecognizedWord] | None:
        """The words of ``stretch``, from the recogniser's process; ``None`` (logged, counted)
        when it failed: the stretch is skipped, and a process that died or hung is started
        again."""
        assert stretch.samples is not None
        executor = self._executor or self._start_recognizer()  # started with the first speech of a recording
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(executor, _recognize, source.settings, stretch.samples)
        call.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved, even given up
        try:  # shielded: a call given up is not cancelled (killing a pool with a cancelled call trips CPython 3.11)
            words, cpu_s = await asyncio.wait_for(
                asyncio.shield(call), HUNG_AFTER_S + HUNG_PER_SPEECH_S * stretch.seconds
            )
        except Exception as exc:  # the recogniser's own failure, its process gone, or hung
            ctx.count("transcription_errors", source=source.source_id)
            why = "the recogniser hung" if isinstance(exc, TimeoutError) else str(exc)
            log.error("transcribing %s at %.1f s failed: %s", source.source_id, stretch.start_ns / NS, why)
            if isinstance(exc, TimeoutError | BrokenProcessPool):
                kill(executor)
                self._executor = None  # started again with the next stretch
            return None
        ctx.count("speech_transcribed_ms", round(stretch.seconds * 1000), source=source.source_id)
        ctx.count("recognizer_cpu_ms", round(cpu_s * 1000), source=source.source_id)
        return words


def _log_failed_warm_up(future: Future[tuple[list[RecognizedWord], float]]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.error("the speech recogniser failed to start: %s", exc)


def _waiting_s(source: _Source) -> float:
    """Seconds of speech waiting for the recogniser (the first may be on it already)."""
    return sum(s.seconds for s in list(source.queued)[1:])


_LOADED: dict[tuple[object, ...], Recognizer] = {}  # in the recogniser's process


def _recognize(settings: TranscriptionConfig, samples: npt.NDArray[np.float32]) -> tuple[list[RecognizedWord], float]:
    """Run in the recogniser's process: ``samples``' words (its recognisers kept loaded),
    and the CPU seconds they took."""
    if _key(settings) not in _LOADED:
        _LOADED[_key(settings)] = load_recognizer(settings)
    start = time.process_time()
    words = _LOADED[_key(settings)].recognize(samples)
    return words, time.process_time() - start


def _key(settings: TranscriptionConfig) -> tuple[object, ...]:
    """What tells one loaded recogniser from another."""
    return (settings.engine, settings.language, settings.model_dir)


def _cut(chunks: deque[AudioChunk], start_ns: int, end_ns: int) -> tuple[npt.NDArray[np.float32], int]:
    """The samples of ``chunks`` from ``start_ns`` to ``end_ns`` (what there is of them),
    and the media time of the first."""
    parts: list[npt.NDArray[np.float32]] = []
    first_ns = start_ns
    for chunk in chunks:
        chunk_end = chunk.pts_ns + chunk.duration_ns
        if chunk_end <= start_ns or chunk.pts_ns >= end_ns:
            continue
        a = max(0, (start_ns - chunk.pts_ns) * AUDIO_SAMPLE_RATE // NS)
        b = min(len(chunk.samples), (end_ns - chunk.pts_ns) * AUDIO_SAMPLE_RATE // NS)
        if not parts:
            first_ns = chunk.pts_ns + a * NS // AUDIO_SAMPLE_RATE
        parts.append(chunk.samples[a:b])
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), first_ns

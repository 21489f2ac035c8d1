"""Audio analysis: level, noise floor, onsets, and speech probability, per 32 ms window.

Chunks of any size are cut into 512-sample windows (32 ms at 16 kHz). For each window:

- ``level_dbfs``: RMS level in dB relative to full scale (floored at -100 dBFS);
- ``floor_dbfs``: the noise floor, which follows the level down at once and rises by at
  most ``floor_rise_db_per_s`` (so a minute of speech does not become "background");
  digital silence (at most -90 dBFS: an encoder's priming samples, a muted input, a
  dropout) leaves it where it was, so the room's noise after it is not heard as loud;
- ``onset``: spectral flux (half-wave rectified increase of the log-magnitude spectrum)
  above its running mean, in running standard deviations, when above ``onset_sigma``;
- ``speech``: Silero VAD probability — run only when the level is at least
  ``vad_gate_db`` above the floor and above ``vad_min_dbfs``. Quiet windows skip the
  model (counted as ``vad_skipped``); after a quiet gap its state is reset.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from stream_rt.config import AudioGateConfig
from stream_rt.graph.node import Context, Node
from stream_rt.graph.packets import AUDIO_SAMPLE_RATE, AudioChunk, AudioFeatures, EndOfStream, Packet, StreamEnded
from stream_rt.operators.vad import WINDOW, SileroVad, vad_available

NS_PER_SAMPLE = 1_000_000_000 // AUDIO_SAMPLE_RATE
DIGITAL_SILENCE_DBFS = -90.0
"""Windows at or below this level are digital silence: they never move the noise floor."""
WINDOW_NS = WINDOW * NS_PER_SAMPLE


class _SourceState:
    def __init__(self, settings: AudioGateConfig) -> None:
        self.p = settings
        self.floor_rise_per_window = settings.floor_rise_db_per_s * WINDOW / AUDIO_SAMPLE_RATE
        self.pending = np.zeros(0, np.float32)
        self.next_pts: int | None = None
        self.floor: float | None = None
        self.prev_spectrum: npt.NDArray[np.float32] | None = None
        self.flux_mean = 0.0
        self.flux_var = 1e-4
        self.quiet_windows = 0
        self.vad: SileroVad | None = None


class AudioAnalyzer(Node):
    """Audio ``audio`` (:class:`AudioChunk`, any size) in, one :class:`AudioFeatures` per
    32 ms window out on ``features`` (level, noise floor, onset, speech probability; see the
    module docstring), per source. A source's end is passed on as :class:`StreamEnded` after
    its last window. Silero VAD runs only when the cheap features say there is sound."""

    inputs = {"audio": (AudioChunk,)}
    outputs = {"features": (AudioFeatures,)}

    def __init__(self, name: str, settings: AudioGateConfig | None = None) -> None:
        """``settings``: every source's, unless :meth:`configure` gives it its own (``vad``
        unset: on when installed; ``enabled`` is the pipeline's to read)."""
        super().__init__(name)
        self.defaults = _with_vad_decided(settings or AudioGateConfig())
        self._settings: dict[str, AudioGateConfig] = {}
        self._hann = np.hanning(WINDOW).astype(np.float32)
        self._sources: dict[str, _SourceState] = {}
        if self.defaults.vad:
            SileroVad()  # fail at build time, in one line, if the model cannot be loaded

    def configure(self, source_id: str, settings: AudioGateConfig) -> None:
        """Give ``source_id`` settings of its own (its effective ``[audio]`` section)."""
        self._settings[source_id] = _with_vad_decided(settings)
        if self._settings[source_id].vad:
            SileroVad()

    def settings(self, source_id: str) -> AudioGateConfig:
        return self._settings.get(source_id, self.defaults)

    async def process(self, packet: Packet, ctx: Context) -> None:
        assert isinstance(packet, AudioChunk)
        for features in self.analyse(packet, ctx):
            await ctx.emit("features", features)

    async def on_control(self, packet: Packet, ctx: Context) -> None:
        if isinstance(packet, EndOfStream):  # one source's audio ended: forget it, tell those after
            self._sources.pop(packet.source_id, None)
            await ctx.emit("features", StreamEnded(packet.source_id, -1, -1, packet.wall_ns, packet.reason))

    def analyse(self, chunk: AudioChunk, ctx: Context | None = None) -> list[AudioFeatures]:
        state = self._sources.get(chunk.source_id)
        if state is None:
            state = self._sources[chunk.source_id] = _SourceState(self.settings(chunk.source_id))
            if state.p.vad:
                state.vad = SileroVad()
        next_pts = state.next_pts
        if next_pts is None or abs(chunk.pts_ns - (next_pts + len(state.pending) * NS_PER_SAMPLE)) > 50_000_000:
            # First chunk, or a jump in media time (reconnect): restart windowing there.
            state.pending = np.zeros(0, np.float32)
            next_pts = chunk.pts_ns
        samples = np.concatenate([state.pending, chunk.samples]) if len(state.pending) else chunk.samples
        out = []
        whole = len(samples) // WINDOW * WINDOW
        for start in range(0, whole, WINDOW):
            window = np.ascontiguousarray(samples[start : start + WINDOW], dtype=np.float32)
            out.append(self._window(chunk, state, window, next_pts, ctx))
            next_pts += WINDOW_NS
        state.next_pts = next_pts
        state.pending = samples[whole:].astype(np.float32, copy=True)
        return out

    def _window(
        self, chunk: AudioChunk, state: _SourceState, window: npt.NDArray[np.float32], pts_ns: int, ctx: Context | None
    ) -> AudioFeatures:
        rms = float(np.sqrt(np.mean(window * window)))
        level = max(-100.0, 20 * math.log10(rms)) if rms > 0 else -100.0
        previous = state.floor
        if level > DIGITAL_SILENCE_DBFS:  # digital silence (priming, a mute, a dropout) says nothing of the room
            rise = state.floor_rise_per_window
            state.floor = level if previous is None or level < previous else min(level, previous + rise)
        floor = state.floor if state.floor is not None else level

        spectrum = np.log1p(100 * np.abs(np.fft.rfft(window * self._hann))).astype(np.float32)
        onset = 0.0
        if state.prev_spectrum is not None:
            flux = float(np.maximum(spectrum - state.prev_spectrum, 0).mean())
            z = (flux - state.flux_mean) / math.sqrt(state.flux_var)
            if z > state.p.onset_sigma and level > floor + state.p.vad_gate_db:
                onset = z
            state.flux_mean += 0.05 * (flux - state.flux_mean)
            state.flux_var += 0.05 * ((flux - state.flux_mean) ** 2 - state.flux_var)
            state.flux_var = max(state.flux_var, 1e-6)
        state.prev_spectrum = spectrum

        speech: float | None = None
        sound = level >= state.p.vad_min_dbfs and level >= floor + state.p.vad_gate_db
        if state.vad is not None:
            if sound:
                if state.quiet_windows > 15:  # ~0.5 s of quiet: start the model afresh
                    state.vad.reset()
                state.quiet_windows = 0
                speech = state.vad(window)
                if ctx is not None:
                    ctx.count("vad_runs", source=chunk.source_id)
            else:
                state.quiet_windows += 1
                if ctx is not None:
                    ctx.count("vad_skipped", source=chunk.source_id)
        return AudioFeatures(chunk.source_id, chunk.seq, pts_ns, chunk.wall_ns, level, floor, onset, speech)


def _with_vad_decided(settings: AudioGateConfig) -> AudioGateConfig:
    """``settings`` with ``vad`` unset decided: on when the 'vad' extra is installed."""
    return settings if settings.vad is not None else settings.model_copy(update={"vad": vad_available()})

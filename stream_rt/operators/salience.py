"""Salience fusion: visual change and audio features become one score per time step.

Each modality is scored 0..1 on its own:

- ``visual``: the share of the frame in changed regions, relative to ``visual_full``
  (that share or more scores 1);
- ``speech``: the highest Silero VAD probability since the last step;
- ``onset``: the strongest spectral-flux onset since the last step, relative to
  ``onset_full`` standard deviations;
- ``loudness``: the highest level above the noise floor since the last step, relative
  to ``loudness_full_db``.

The score is the largest weighted component (any modality alone can make a scene
salient); all components are kept for explanation. A time step is a video frame; for a
source that sends no video, it is ``audio_step_s`` of audio.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stream_rt.graph.node import Context, Node
from stream_rt.graph.packets import AudioFeatures, ChangeMap, Packet, Salience, VideoFrame


@dataclass
class _Pending:
    speech: float = 0.0
    onset: float = 0.0
    loudness: float = 0.0
    audio_start_ns: int | None = None
    frame: VideoFrame | None = field(default=None, repr=False)
    video_seen: bool = False


class SalienceFusion(Node):
    inputs = {"changes": (ChangeMap,), "audio": (AudioFeatures,)}
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
    ) -> None:
        super().__init__(name)
        self.visual_full = visual_full
        self.onset_full = onset_full
        self.loudness_full_db = loudness_full_db
        self.weights = {"visual": 1.0, "speech": 1.0, "onset": 0.6, "loudness": 0.5, **(weights or {})}
        self.audio_step_ns = int(audio_step_s * 1e9)
        self._pending: dict[str, _Pending] = {}

    async def process(self, packet: Packet, ctx: Context) -> None:
        pending = self._pending.setdefault(packet.source_id, _Pending())
        if isinstance(packet, ChangeMap):
            pending.video_seen = True
            await ctx.emit("salience", self._fuse(packet, pending))
        elif isinstance(packet, AudioFeatures):
            if packet.speech is not None:
                pending.speech = max(pending.speech, packet.speech)
            pending.onset = max(pending.onset, min(1.0, packet.onset / self.onset_full))
            above = (packet.level_dbfs - packet.floor_dbfs) / self.loudness_full_db
            pending.loudness = max(pending.loudness, min(1.0, max(0.0, above)))
            if pending.audio_start_ns is None:
                pending.audio_start_ns = packet.pts_ns
            if not pending.video_seen and packet.pts_ns - pending.audio_start_ns >= self.audio_step_ns:
                await ctx.emit("salience", self._fuse(packet, pending))

    def _fuse(self, packet: ChangeMap | AudioFeatures, pending: _Pending) -> Salience:
        visual = 0.0
        regions: tuple[tuple[int, int, int, int], ...] = ()
        frame = pending.frame
        if isinstance(packet, ChangeMap):
            regions = packet.regions
            frame = packet.frame
            area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in regions)
            visual = min(1.0, area / (frame.width * frame.height) / self.visual_full)
        components = {
            "visual": visual,
            "speech": pending.speech,
            "onset": pending.onset,
            "loudness": pending.loudness,
        }
        score = max(self.weights[name] * value for name, value in components.items())
        self._pending[packet.source_id] = _Pending(frame=frame, video_seen=pending.video_seen)
        return Salience(
            packet.source_id, packet.seq, packet.pts_ns, packet.wall_ns, min(1.0, score), components, regions, frame
        )

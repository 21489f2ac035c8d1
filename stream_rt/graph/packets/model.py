"""Model packets: a request for the multimodal model and its answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from stream_rt.graph.packets.base import Packet
from stream_rt.graph.packets.media import AUDIO_SAMPLE_RATE
from stream_rt.graph.packets.perception import AudioFeatures


@dataclass(frozen=True, slots=True)
class MllmRequest(Packet):
    """A question for the multimodal model about one event: the ``images`` (RGB, HxWx3
    uint8: the keyframe, then crops of its changed regions — or, for a clip, frames in
    time order with their ``frame_pts`` and the ``audio`` features of that span, which
    audio-guided compression uses, and the span's ``sound`` — 16 kHz mono samples from
    ``sound_pts_ns`` — for a model that hears), the ``question``, and a line of ``context`` (what the
    event is: times, salience). ``signature`` is a small summary of the scene, compared by
    answer reuse. ``memory``: the source's streaming-memory entries, which backends that
    can take them put before the prompt; ``summary_tokens``: how many pooled visual tokens
    of the keyframe the answer should carry back for the memory (0: none)."""

    event_id: str
    question: str
    images: tuple[npt.NDArray[np.uint8], ...] = field(default=(), repr=False, compare=False)
    context: str = ""
    signature: npt.NDArray[np.float32] | None = field(default=None, repr=False, compare=False)
    frame_pts: tuple[int, ...] = field(default=(), compare=False)
    audio: tuple[AudioFeatures, ...] = field(default=(), repr=False, compare=False)
    memory: tuple[Any, ...] = field(default=(), repr=False, compare=False)  # MemoryEntry (the graph knows no memory)
    summary_tokens: int = 0
    sound: npt.NDArray[np.float32] | None = field(default=None, repr=False, compare=False)
    sound_pts_ns: int = 0

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record.update(
            event_id=self.event_id,
            question=self.question,
            context=self.context,
            images=[list(image.shape[:2]) for image in self.images],
            memory_entries=len(self.memory),
        )
        if self.sound is not None:
            record["sound_s"] = round(len(self.sound) / AUDIO_SAMPLE_RATE, 3)
        return record


AnswerStatus = Literal["ok", "invalid", "error", "timeout", "reused", "dropped"]


@dataclass(frozen=True, slots=True)
class MllmAnswer(Packet):
    """The model's answer to an :class:`MllmRequest`.

    ``status``: ``ok`` (``answer`` holds the validated answer contract), ``invalid`` (the
    model's text did not satisfy the contract; ``text`` has it), ``error`` / ``timeout``
    (the call failed; ``error`` says why), ``reused`` (the scene and question had not
    changed: the last answer, not a new call), ``dropped`` (a newer request replaced this
    one while it waited for the model). ``stop`` says why decoding ended
    (``contract``: the JSON answer was complete; ``eos``; ``max_tokens``). ``timings`` are
    seconds (``queued``, ``encode``, ``prefill``, ``decode``, ``total``), ``tokens`` counts
    (``prompt``, ``visual``, ``generated``). ``smoke``: the answer comes from the smoke
    model, whose random weights make it meaningless. ``visual_summary``: the keyframe's
    pooled visual tokens when the request asked for them (for the streaming memory; not
    published). ``repeat``: the answer says what the source's previous answer said, in the
    same episode (``confidence`` aside): not news, so notifications can skip it.
    ``frame_pts``: the media times of a clip's frames the model was shown, oldest first.
    """

    event_id: str
    question: str
    status: AnswerStatus
    answer: dict[str, Any] | None
    text: str
    model: str
    smoke: bool = False
    error: str = ""
    stop: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    exit_depth: float | None = None
    visual_summary: npt.NDArray[np.float32] | None = field(default=None, repr=False, compare=False)
    repeat: bool = False
    frame_pts: tuple[int, ...] = ()

    def to_record(self) -> dict[str, Any]:
        record = Packet.to_record(self)
        record.update(
            event_id=self.event_id,
            question=self.question,
            status=self.status,
            answer=self.answer,
            text=self.text,
            model=self.model,
            error=self.error,
            stop=self.stop,
            timings={k: round(v, 4) for k, v in self.timings.items()},
            tokens=dict(self.tokens),
            exit_depth=self.exit_depth,
            repeat=self.repeat,
        )
        if self.frame_pts:
            record["frame_pts_ns"] = list(self.frame_pts)
        if self.smoke:
            record["smoke"] = "smoke model with random weights: this answer is not meaningful"
        return record

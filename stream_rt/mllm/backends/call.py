"""The values one call of the transformers backend hands from step to step.

:meth:`~stream_rt.mllm.backends.transformers_backend.TransformersBackend.generate` on a
family adapter is a list of steps, each taking the value the one before returned:

    prepare -> Inputs -> encode (and hear) -> Encoded -> summarise -> Encoded -> compress -> Encoded
            -> prefill (after the memory prefix) -> Prefilled -> decode -> Decoded

Each step does what its technique asks when the technique is on, and hands the value on
unchanged otherwise. What a caller tells a call beyond its images and text comes as the
first three values here (:class:`ReuseKey`, :class:`ClipTiming`, :class:`SourceMemory`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

if TYPE_CHECKING:
    from stream_rt.graph.packets import AudioFeatures
    from stream_rt.memory.streaming import MemoryEntry
    from stream_rt.mllm.backends.decoding import TokenLogprob
    from stream_rt.mllm.models.families import HeardFeatures, Prepared, VisualFeatures
    from stream_rt.mllm.models.layer_loop import KV
    from stream_rt.mllm.techniques.token_reuse import ReuseCall, ReuseOutcome


@dataclass(frozen=True)
class ReuseKey:
    """Where a call's token-reuse entry is kept — its source and question — and the
    episode (event id) it belongs to: a call of another episode starts afresh."""

    source_id: str
    question: str
    event_id: str

    @property
    def cache_key(self) -> tuple[str, str]:
        return (self.source_id, self.question)


@dataclass(frozen=True)
class ClipTiming:
    """A multi-frame request's frame times (ns, one per image) and the audio features over
    its span: what clip compression weighs the frames' tokens by; and the span's sound
    (16 kHz mono samples from ``sound_pts`` ns), which a model that hears takes as audio."""

    frame_pts: list[int]
    audio: list[AudioFeatures]
    sound: npt.NDArray[np.float32] | None = None
    sound_pts: int = 0


@dataclass(frozen=True)
class SourceMemory:
    """A source's memory entries, oldest first, which go before the prompt as a K/V
    prefix (:mod:`stream_rt.mllm.techniques.memory_prefix`)."""

    source_id: str
    entries: tuple[MemoryEntry, ...]


@dataclass(frozen=True)
class Inputs:
    """Prepare's value: the request as the model takes it (pixel tensors on the model's
    device), the token-reuse call begun for it (``None``: no reuse) and the fingerprint of
    the memory that goes before it (``""``: none)."""

    images: int  # how many images the request has
    prepared: Prepared
    reuse: ReuseCall | None
    memory_fingerprint: str


@dataclass(frozen=True)
class Encoded:
    """Encode's value, which summarise and compress hand on changed: the visual features
    (``None``: no images) that replace the visual tokens of ``prepared``."""

    inputs: Inputs
    prepared: Prepared  # the request, compressed once compression ran
    features: VisualFeatures | None
    encode_s: float
    encoded_at: float  # when encoding ended: the prefill's time counts from here
    summary: npt.NDArray[np.float32] | None = None  # the keyframe's pooled visual tokens, when asked for
    kept: npt.NDArray[np.intp] | None = None  # compression: which of the request's visual tokens each kept one is
    visual_dropped: int = 0  # visual tokens compression left out
    heard: HeardFeatures | None = None  # a model that hears: the sound's audio features (compressed once it ran)
    audio_dropped: int = 0  # audio tokens compression left out


@dataclass(frozen=True)
class Prefilled:
    """Prefill's value: the last position's logits and every layer's K/V, the memory
    prefix's included, ready to decode from."""

    prepared: Prepared
    logits: torch.Tensor  # (1, vocab)
    cache: KV
    prefill_s: float
    memory_tokens: int = 0  # length of the memory prefix before the prompt
    reuse: ReuseOutcome | None = None  # what token reuse saved, when it ran


@dataclass(frozen=True)
class Decoded:
    """Decode's value: the answer and why it stopped."""

    token_ids: list[int]
    text: str
    stop: str
    decode_s: float
    exit_depth: float | None  # mean layers run per decoded token, with the layer exit
    logprobs: list[TokenLogprob] | None

"""Applying audio-guided token compression (:mod:`stream_rt.operators.compression`) to a
prepared multi-frame request: the dropped visual tokens leave the sequence, the kept ones
keep their original position ids (M-RoPE's 3-D ones for Qwen2-VL), so the model sees the
frames where they were, with gaps. A kept token keeps every row of its features (its
DeepStack rows too, for Qwen3-VL).

For a model that hears the clip (:attr:`~stream_rt.mllm.models.families.Family.hears`),
:meth:`Compression.apply_heard` takes the guidance as OmniZip does: the audio tokens its
audio encoder attended to least leave the sequence too (``audio_keep`` of them stay), and
each window's share of audio tokens kept sets its video keep rate."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from stream_rt.graph.packets import AudioFeatures
from stream_rt.mllm.models.families import Family, HeardFeatures, Prepared, VisualFeatures
from stream_rt.operators.compression import FrameTokens, HeardTokens, compress, keep_heard


@dataclass
class Compression:
    average: float = 0.4
    window_s: float = 2.0
    mode: Literal["audio", "uniform"] = "audio"
    audio_keep: float = 0.7  # a model that hears: the share of its audio tokens kept
    last_kept: float = 1.0  # share of visual tokens the last compressed request kept
    last_heard_kept: float = 1.0  # share of audio tokens the last request that was heard kept

    def apply(
        self,
        family: Family,
        prepared: Prepared,
        features: VisualFeatures,
        frame_pts: list[int],
        audio: list[AudioFeatures],
    ) -> tuple[Prepared, VisualFeatures, npt.NDArray[np.intp]]:
        """(the compressed request, its visual features, which of the request's visual
        tokens each kept one is) for one image per frame."""
        kept_visual, rows = self._kept_visual(family, prepared, features, frame_pts, audio, None)
        return _cut(prepared, kept_visual), features.rows(rows.to(features.tokens.device)), rows.numpy()

    def apply_heard(
        self,
        family: Family,
        prepared: Prepared,
        features: VisualFeatures,
        heard: HeardFeatures,
        frame_pts: list[int],
        sound_pts: int,
    ) -> tuple[Prepared, VisualFeatures, npt.NDArray[np.intp], HeardFeatures]:
        """As :meth:`apply`, for a request with the clip's sound (starting at ``sound_pts``
        ns) whose audio tokens the model heard as ``heard``; also its kept audio features.
        ``mode="uniform"`` keeps every audio token and the same share of every frame."""
        attention = heard.attention.float().cpu().numpy()
        kept_audio = keep_heard(attention, self.audio_keep) if self.mode == "audio" else np.ones(len(heard), bool)
        times = sound_pts + heard.offsets_ns.cpu().numpy()
        guidance = HeardTokens(times.astype(np.int64), kept_audio)
        kept_visual, rows = self._kept_visual(family, prepared, features, frame_pts, [], guidance)
        assert prepared.audio_mask is not None
        audio_at = torch.nonzero(prepared.audio_mask.cpu()).flatten().numpy()
        if len(audio_at) != len(heard):
            raise ValueError(f"{len(audio_at)} audio tokens in the prompt for {len(heard)} audio features")
        self.last_heard_kept = float(kept_audio.mean()) if len(kept_audio) else 1.0
        heard_rows = torch.from_numpy(np.nonzero(kept_audio)[0])
        compressed = _cut(prepared, kept_visual, audio_at[kept_audio])
        return compressed, features.rows(rows.to(features.tokens.device)), rows.numpy(), heard.rows(heard_rows)

    def _kept_visual(
        self,
        family: Family,
        prepared: Prepared,
        features: VisualFeatures,
        frame_pts: list[int],
        audio: list[AudioFeatures],
        heard: HeardTokens | None,
    ) -> tuple[npt.NDArray[np.int64], torch.Tensor]:
        """(the prompt positions of the visual tokens kept, their rows among the features)."""
        grids = family.token_grids(prepared)
        per_image = [sum(g.size for g in grids if g.image == i) for i in range(len(frame_pts))]
        visual = torch.nonzero(prepared.image_mask.cpu()).flatten().numpy()
        if sum(per_image) != len(visual) or len(visual) != len(features):
            raise ValueError("compression needs one image per frame, each image's tokens together")
        frames, offset = [], 0
        host = features.tokens.detach().float().cpu().numpy()
        for pts, n in zip(frame_pts, per_image, strict=True):
            frames.append(FrameTokens(pts, host[offset : offset + n], visual[offset : offset + n].astype(np.int64)))
            offset += n
        kept_visual = np.concatenate(compress(frames, audio, window_s=self.window_s, average=self.average,
                                              mode=self.mode, heard=heard))  # fmt: skip
        self.last_kept = len(kept_visual) / max(1, len(visual))
        return kept_visual, torch.from_numpy(np.searchsorted(visual, kept_visual))


def _cut(
    prepared: Prepared, kept_visual: npt.NDArray[np.int64], kept_audio: npt.NDArray[np.int64] | None = None
) -> Prepared:
    """``prepared`` with only the visual tokens at positions ``kept_visual`` and — where
    given — the audio tokens at ``kept_audio`` (every other token stays), each keeping its
    position ids."""
    dropped = prepared.image_mask.cpu().numpy().copy()
    if kept_audio is not None and prepared.audio_mask is not None:
        dropped |= prepared.audio_mask.cpu().numpy()
    keep = ~dropped
    keep[kept_visual] = True
    if kept_audio is not None:
        keep[kept_audio] = True
    index = torch.from_numpy(np.nonzero(keep)[0])
    if prepared.position_ids is not None:
        positions = prepared.position_ids[..., index.to(prepared.position_ids.device)]
    else:
        positions = torch.arange(prepared.length)[index][None]
    device = prepared.input_ids.device
    audio_mask = prepared.audio_mask[index.to(prepared.audio_mask.device)] if prepared.audio_mask is not None else None
    return replace(
        prepared,
        input_ids=prepared.input_ids[:, index.to(device)],
        image_mask=prepared.image_mask[index.to(prepared.image_mask.device)],
        position_ids=positions,
        audio_mask=audio_mask,
    )

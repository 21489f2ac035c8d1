"""Applying audio-guided token compression (:mod:`stream_rt.operators.compression`) to a
prepared multi-frame request: the dropped visual tokens leave the sequence, the kept ones
keep their original position ids (M-RoPE's 3-D ones for Qwen2-VL), so the model sees the
frames where they were, with gaps. A kept token keeps every row of its features (its
DeepStack rows too, for Qwen3-VL)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from stream_rt.graph.packets import AudioFeatures
from stream_rt.mllm.models.families import Family, Prepared, VisualFeatures
from stream_rt.operators.compression import FrameTokens, compress


@dataclass
class Compression:
    average: float = 0.4
    window_s: float = 2.0
    mode: Literal["audio", "uniform"] = "audio"
    last_kept: float = 1.0  # share of visual tokens the last compressed request kept

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
                                              mode=self.mode))  # fmt: skip
        keep = ~prepared.image_mask.cpu().numpy()
        keep[kept_visual] = True
        index = torch.from_numpy(np.nonzero(keep)[0])
        rows = torch.from_numpy(np.searchsorted(visual, kept_visual))
        if prepared.position_ids is not None:
            positions = prepared.position_ids[..., index.to(prepared.position_ids.device)]
        else:
            positions = torch.arange(prepared.length)[index][None]
        self.last_kept = len(kept_visual) / max(1, len(visual))
        device = prepared.input_ids.device
        compressed = replace(
            prepared,
            input_ids=prepared.input_ids[:, index.to(device)],
            image_mask=prepared.image_mask[index.to(prepared.image_mask.device)],
            position_ids=positions,
        )
        return compressed, features.rows(rows.to(features.tokens.device)), rows.numpy()

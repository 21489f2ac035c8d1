"""The adapters of the models that hear: Qwen2.5-Omni's and Qwen3-Omni's thinkers, which take
a clip's sound as audio beside its frames, with their audio encoder's own attention as the
guidance of audio-guided compression (OmniZip).

The request is one user turn: the clip's frames as images (Qwen2.5-VL's vision tower: 14
px patches merged 2x2, each image encoded on its own), then the clip's sound between
``<|audio_bos|>`` and ``<|audio_eos|>``, then the text. The sound goes through Whisper's
feature extractor (128 mel bins, 10 ms a frame) and the audio encoder (two stride-2 steps:
one token per 40 ms, 25 a second); position ids are the model's own M-RoPE ones
(``get_rope_index``: each image a grid, the audio a run of positions). Frames go as images
rather than as a video because transformers' video processors need torchvision
(:mod:`stream_rt.mllm.models.processors`), so frames and sound are not interleaved by time
in the prompt as the model's own ``use_audio_in_video`` would; compression still weighs
them by time.

:meth:`QwenOmni.hear` runs the audio encoder and, from the inputs of its last layer's
attention, computes that layer's attention weights as OmniZip does — ``softmax(Q K^T /
sqrt(d))`` over all the sound's positions (the encoder itself attends within windows of
``2 * n_window`` mel frames; OmniZip's score spans the whole sound, so that a loud window
and a quiet one can be told apart): each audio token's **received attention** — the mean
over the queries, averaged over heads, then over the two encoder frames each token
pools — is OmniZip's audio salience (:func:`~stream_rt.operators.compression.keep_heard`).

Qwen3-Omni's thinker (``qwen3_omni_moe_thinker``, :class:`Qwen3Omni`) is the same layout and
the same M-RoPE rule (its ``get_rope_index`` takes the same arguments) with other parts:
images through Qwen3-VL's vision tower (16 px patches, DeepStack features added to the
visual tokens after the first decoder layers), a mixture-of-experts decoder with q/k norms
(each token routed on its own, so computing only some rows of a layer stays exact), and
an audio encoder whose three stride-2 2-D convolutions run over windows of ``2 * n_window``
mel frames (1 s) *before* its layers: 13 tokens a window, each encoder position one token
(80 ms), so the attention a position received is its token's, nothing averaged. Its
layers attend within windows of ``n_window_infer`` frames; the score, as above, spans the
whole sound.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from transformers import PreTrainedModel

from stream_rt.graph.packets import AUDIO_SAMPLE_RATE
from stream_rt.mllm.models.families import (
    TEXT_INPUTS,
    Family,
    HeardFeatures,
    Message,
    Prepared,
    QwenImageGrids,
    Sound,
    VisualFeatures,
    flatten,
    with_deepstack,
)


class QwenOmni(QwenImageGrids, Family):
    """Qwen2.5-Omni's thinker: Qwen2.5-VL's images and decoder, Whisper-style audio."""

    name = "qwen2_5_omni"
    adapter = True
    mrope = True
    hears = True
    model_types = ("qwen2_5_omni_thinker",)

    def __init__(self, path: Path, config: Any, processor: Any = None) -> None:
        super().__init__(path, config, processor)
        self.merge = int(config.vision_config.spatial_merge_size)
        self.audio_token_id = int(config.audio_token_id)
        hop = int(getattr(getattr(self.processor, "feature_extractor", None), "hop_length", 160))
        self.token_ns = 4 * hop * 1_000_000_000 // AUDIO_SAMPLE_RATE  # two stride-2 steps after the mel frames

    def prepare(
        self,
        images: list[npt.NDArray[np.uint8]],
        messages: list[Message],
        model: PreTrainedModel,
        sound: Sound | None = None,
    ) -> Prepared:
        out = self.inputs(images, messages, sound)
        ids = out["input_ids"]
        inputs = {k: v for k, v in out.items() if k not in TEXT_INPUTS}
        audio_mask = ids[0] == self.audio_token_id if sound is not None else None
        prepared = Prepared(ids, inputs, ids[0] == self.image_token_id, None, ids.shape[1], audio_mask)
        return self.positioned(prepared, model)

    def positioned(self, prepared: Prepared, model: PreTrainedModel) -> Prepared:
        if not prepared.vision:
            return prepared
        ids = prepared.input_ids
        mask = prepared.vision.get("feature_attention_mask")
        position_ids, _ = model.model.get_rope_index(
            ids, prepared.vision.get("image_grid_thw"), None, torch.ones_like(ids), False,
            mask.sum(-1) if mask is not None else None, None,
        )  # fmt: skip
        return replace(prepared, position_ids=position_ids, next_position=int(position_ids.max()) + 1)

    def encode(self, model: PreTrainedModel, prepared: Prepared) -> VisualFeatures:
        if "pixel_values" not in prepared.vision:  # the sound alone
            return VisualFeatures(torch.zeros((0, model.config.get_text_config().hidden_size)))
        return self.encoded(model, prepared.vision["pixel_values"], prepared.vision["image_grid_thw"])

    def hear(self, model: PreTrainedModel, prepared: Prepared) -> HeardFeatures | None:
        """The audio encoder's features of the sound, with the attention each token
        received in the encoder's last layer (see the module's text)."""
        features = prepared.vision.get("input_features")
        if features is None:
            return None
        tower = model.model.audio_tower
        seen: dict[str, torch.Tensor] = {}

        def keep_inputs(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        handle = tower.layers[-1].self_attn.register_forward_pre_hook(keep_inputs, with_kwargs=True)
        try:
            out = model.model.get_audio_features(
                features, feature_attention_mask=prepared.vision["feature_attention_mask"]
            )
        finally:
            handle.remove()
        tokens = flatten(out)
        per_token, offsets = self.per_token(received_attention(tower.layers[-1].self_attn, seen["hidden"]), len(tokens))
        return HeardFeatures(tokens, per_token, offsets)

    def per_token(self, received: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the attention each of ``tokens`` audio tokens received, its start in the sound in
        ns), from the attention ``received`` by each position of the encoder's last layer."""
        per_token = received[: 2 * tokens].view(tokens, 2).mean(1)  # the encoder averages each pair of frames
        return per_token, torch.arange(tokens, dtype=torch.int64) * self.token_ns


class Qwen3Omni(QwenOmni):
    """Qwen3-Omni's thinker: Qwen2.5-Omni's layout (images, then the sound, then the text;
    the same M-RoPE rule), with Qwen3-VL's vision tower (16 px patches, DeepStack) and
    decoder (q/k norms, mixture of experts), and an audio encoder whose convolutions come
    before its layers (see the module's text)."""

    name = "qwen3_omni_moe"
    model_types = ("qwen3_omni_moe_thinker",)

    def __init__(self, path: Path, config: Any, processor: Any = None) -> None:
        super().__init__(path, config, processor)
        n_window = int(config.audio_config.n_window)
        hop = int(getattr(getattr(self.processor, "feature_extractor", None), "hop_length", 160))
        self.window_ns = 2 * n_window * hop * 1_000_000_000 // AUDIO_SAMPLE_RATE  # a window of 2 * n_window mel frames
        self.per_window = -(-2 * n_window // 8)  # three stride-2 convolutions: one token per 8 mel frames, rounded up
        self.token_ns = 8 * hop * 1_000_000_000 // AUDIO_SAMPLE_RATE

    def encoded(self, model: PreTrainedModel, pixels: torch.Tensor, grid_thw: torch.Tensor) -> VisualFeatures:
        return with_deepstack(model.model.get_image_features(pixels, grid_thw))

    def per_token(self, received: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each encoder position is a token (the convolutions pooled before the layers); a
        token's time: its window's start, then 80 ms a token."""
        index = torch.arange(tokens, dtype=torch.int64)
        return received[:tokens], index // self.per_window * self.window_ns + index % self.per_window * self.token_ns


def received_attention(attention: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Per position of ``hidden`` (positions, width: the input of an audio encoder layer's
    attention ``attention``), the attention it received: the mean over every position
    (query) of the layer's softmax weights over all positions, averaged over heads —
    OmniZip's ``softmax(Q K^T / sqrt(d))`` over the whole sound's tokens."""
    heads = int(attention.num_heads)
    q = attention.q_proj(hidden).view(len(hidden), heads, -1).transpose(0, 1)
    k = attention.k_proj(hidden).view(len(hidden), heads, -1).transpose(0, 1)
    weights = (q @ k.transpose(-1, -2) * attention.scaling).float().softmax(-1)  # (heads, queries, keys)
    return weights.mean(dim=(0, 1)).cpu()

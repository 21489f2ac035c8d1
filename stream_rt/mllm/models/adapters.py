"""The family adapters: the families whose decoder layers stream_rt runs itself, in the
one layer loop (:mod:`stream_rt.mllm.models.layer_loop`), where the techniques live.

Adapters and what they support (a model without one runs on the generic path, where the
backend refuses every technique at load, :func:`~stream_rt.mllm.backends.loading.inspect_model`):

- Every adapter: token reuse, clip compression, the memory's K/V prefix, the layer exit,
  and tile reuse over the pieces its vision encoder sees each on its own — an image whose
  pixels a cached call saw reuses that call's encoder output exactly (a clip's frames,
  shared by consecutive calls, are encoded once).
- Qwen2-VL / Qwen2.5-VL, Qwen3-VL (and Qwen3-VL-MoE: its experts route each token on its
  own, so computing some rows of a layer is still exact), LLaVA, Gemma 3: the encoder's
  attention never crosses from one image to another, so each image is such a piece (with
  Qwen3-VL's DeepStack rows); Gemma 3's pan-and-scan crops are off on this path.
- Qwen2.5-Omni's thinker (:mod:`stream_rt.mllm.models.omni`): Qwen2.5-VL's images, and the
  clip's sound as audio; compression takes its guidance from the audio encoder's attention.
  Qwen3-Omni's thinker the same, with Qwen3-VL's images (DeepStack) and a mixture-of-experts
  decoder.
- SmolVLM / Idefics3: its encoder works tile by tile, so each 512 px tile is a piece, and a
  changed tile recomputes only the patches that moved (``encoder_partial``).

Families that stay on the generic path (the model's own ``generate``), and why:

- Qwen3.5 / Qwen3.5-MoE (``qwen3_5``, ``qwen3_5_moe``): three of every four decoder layers
  are Gated DeltaNet linear attention, a recurrent state rather than per-position K/V, so
  a position cannot keep last call's K/V (token reuse), a memory prefix is a state rather
  than K/V to put before a prompt, and the one layer loop would need the recurrence.
- Gemma 4 (``gemma4``): another decoder layer than Gemma 3's — per-layer input
  embeddings looked up from the token ids and fed to every layer, value norms, a
  per-layer output scale, keys that double as values in its global layers where
  configured, partial ("proportional") rotary, and its last layers reading
  the K/V an earlier layer computed (K/V sharing), which token reuse and the layer exit,
  both filling K/V layer by layer, would have to follow.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from stream_rt.mllm.models.families import (
    Family,
    Layout,
    Prepared,
    QwenImageGrids,
    TileState,
    VisualFeatures,
    flatten,
    with_deepstack,
)
from stream_rt.mllm.models.layer_loop import LayerStack, run_layers
from stream_rt.mllm.models.omni import Qwen3Omni, QwenOmni
from stream_rt.operators.token_reuse import TokenGrid


class Qwen2VL(QwenImageGrids, Family):
    """Qwen2-VL and Qwen2.5-VL: dynamic resolution, 2x2 patch merge, M-RoPE positions."""

    name = "qwen2_vl"
    adapter = True
    mrope = True
    model_types = ("qwen2_vl", "qwen2_5_vl")

    def __init__(self, path: Path, config: Any, processor: Any = None) -> None:
        super().__init__(path, config, processor)
        self.merge = int(config.vision_config.spatial_merge_size)

    def positioned(self, prepared: Prepared, model: PreTrainedModel) -> Prepared:
        if not prepared.vision:
            return prepared
        ids = prepared.input_ids
        position_ids, _ = model.model.get_rope_index(
            ids, prepared.image_mask[None].int(), image_grid_thw=prepared.vision["image_grid_thw"],
            attention_mask=torch.ones_like(ids),
        )  # fmt: skip
        return replace(prepared, position_ids=position_ids, next_position=int(position_ids.max()) + 1)

    def encode(self, model: PreTrainedModel, prepared: Prepared) -> VisualFeatures:
        return self.encoded(model, prepared.vision["pixel_values"], prepared.vision["image_grid_thw"])


class Idefics3(Family):
    """SmolVLM and Idefics3: the image is split into tiles plus a downscaled global view;
    each tile is encoded on its own and pixel-shuffled into ``image_seq_len`` tokens."""

    name = "idefics3"
    adapter = True
    model_types = ("idefics3", "smolvlm")

    def encode(self, model: PreTrainedModel, prepared: Prepared) -> VisualFeatures:
        out = model.model.get_image_features(
            prepared.vision["pixel_values"], prepared.vision.get("pixel_attention_mask")
        )
        return VisualFeatures(flatten(out))

    partial_encoder = True

    def tiles(self, prepared: Prepared) -> int:
        return int(prepared.vision["pixel_values"].shape[1]) if prepared.vision else 0

    def tile_pixels(self, prepared: Prepared, tile: int) -> torch.Tensor:
        return prepared.vision["pixel_values"][0, tile]

    def encode_tile(self, model: PreTrainedModel, prepared: Prepared, tile: int) -> VisualFeatures:
        mask = prepared.vision.get("pixel_attention_mask")
        pixels = prepared.vision["pixel_values"][:, tile : tile + 1]
        out = model.model.get_image_features(pixels, mask[:, tile : tile + 1] if mask is not None else None)
        return VisualFeatures(flatten(out))

    def encode_tile_reusing(
        self,
        model: PreTrainedModel,
        prepared: Prepared,
        tile: int,
        changed_tokens: torch.Tensor | None,
        state: TileState | None,
        start_layer: int,
    ) -> tuple[torch.Tensor, TileState]:
        """Encode one tile through the vision encoder's layers, run by us. With
        ``changed_tokens`` (bool per token of the tile) and the tile's previous ``state``
        (per-layer K/V and last hidden states), the patches under unchanged tokens stop
        being queries from ``start_layer`` on and keep their previous K/V and output,
        while the changed patches still attend to them. Returns (features, new state)."""
        vision = model.model.vision_model
        pixels = prepared.vision["pixel_values"][:, tile].to(vision.dtype)
        per_side = pixels.shape[-1] // vision.patch_size
        grid = torch.ones((1, per_side, per_side), dtype=torch.bool, device=pixels.device)
        hidden = vision.embeddings(pixel_values=pixels, patch_attention_mask=grid)
        everything = torch.arange(hidden.shape[1], device=hidden.device)
        layers = vision.encoder.layers
        computed, previous = None, None
        if changed_tokens is not None and state is not None:
            side = round(changed_tokens.numel() ** 0.5)
            scale = per_side // side
            patch_changed = changed_tokens.view(side, side).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
            changed = everything[patch_changed.flatten().to(hidden.device)]
            computed = [everything if index < start_layer else changed for index in range(len(layers))]
            previous = (state[0], state[1])
        run = run_layers(SiglipLayers(layers), hidden, computed, previous)
        hidden, rows, keys, values = run.hidden, run.rows, run.keys, run.values
        if len(rows) != len(everything):
            assert state is not None
            last = state[2].clone()
            last[:, rows] = hidden
            hidden = last
        features = model.model.connector(vision.post_layernorm(hidden))
        return features.reshape(-1, features.shape[-1]), (keys, values, hidden)

    def token_grids(self, prepared: Prepared) -> list[TokenGrid]:
        """Each run of visual tokens follows the token naming its tile (``<row_r_col_c>``)
        or the global view (``<global-img>``), which closes that image."""
        ids = prepared.input_ids[0].tolist()
        side = round(int(getattr(self.processor, "image_seq_len", 0)) ** 0.5)
        images: list[list[tuple[int, int]]] = [[]]  # per image, (row, col) per run; (0, 0) global
        for i, token in enumerate(ids):
            if token == self.image_token_id and (i == 0 or ids[i - 1] != self.image_token_id):
                tag = str(self.tokenizer.convert_ids_to_tokens(ids[i - 1])) if i else ""
                place = (0, 0)
                if tag.startswith("<row_"):
                    row, col = tag[5:-1].split("_col_")
                    place = (int(row), int(col))
                images[-1].append(place)
                if place == (0, 0):
                    images.append([])
        grids = []
        for image, places in enumerate(p for p in images if p):
            rows = max(r for r, _ in places) or 1
            cols = max(c for _, c in places) or 1
            for r, c in places:
                whole = (r, c) == (0, 0)
                region = (0.0, 0.0, 1.0, 1.0) if whole else ((c - 1) / cols, (r - 1) / rows, c / cols, r / rows)
                grids.append(TokenGrid(image, region, side, side))
        return grids


class SiglipLayers(LayerStack):
    """SigLIP's vision encoder layers (Idefics3 / SmolVLM) in the one layer loop: layer
    norm, multi-head attention over every patch of the tile (no positions: the embeddings
    carry them), out projection, layer norm and MLP, each with its residual."""

    def __init__(self, layers: Any) -> None:
        self.layers = layers

    def project(self, index: int, layer: Any, hidden: torch.Tensor,
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        shape = (1, len(rows), attn.num_heads, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        return q, k, v

    def forward(self, index: int, layer: Any, hidden: torch.Tensor, rows: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # fmt: skip
        attn = layer.self_attn
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(1, len(rows), -1))
        return hidden + layer.mlp(layer.layer_norm2(hidden))


class Llava(Family):
    """LLaVA 1.5 style: one fixed-size image, every vision patch a token."""

    name = "llava"
    adapter = True
    model_types = ("llava",)

    def encode(self, model: PreTrainedModel, prepared: Prepared) -> VisualFeatures:
        return self.encoded(model, prepared.vision["pixel_values"])

    def encoded(self, model: PreTrainedModel, pixels: torch.Tensor) -> VisualFeatures:
        out = model.model.get_image_features(
            pixels,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        return VisualFeatures(flatten(out))

    def tiles(self, prepared: Prepared) -> int:
        """Each image: the encoder sees one at a time."""
        return int(prepared.vision["pixel_values"].shape[0]) if prepared.vision else 0

    def tile_pixels(self, prepared: Prepared, tile: int) -> torch.Tensor:
        return prepared.vision["pixel_values"][tile]

    def encode_tile(self, model: PreTrainedModel, prepared: Prepared, tile: int) -> VisualFeatures:
        return self.encoded(model, prepared.vision["pixel_values"][tile : tile + 1])

    def token_grids(self, prepared: Prepared) -> list[TokenGrid]:
        """Each image is one square of patches, every patch a token (the class token, if
        the strategy kept it, is not a visual token of the prompt)."""
        vision = self.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        images = int(prepared.vision["pixel_values"].shape[0]) if prepared.vision else 0
        return [TokenGrid(i, (0.0, 0.0, 1.0, 1.0), side, side) for i in range(images)]


class Qwen3VL(Qwen2VL):
    """Qwen3-VL and Qwen3-VL-MoE: Qwen2-VL's layout (16-pixel patches merged 2x2, M-RoPE
    positions from the model's ``get_rope_index``; the interleaving of the three axes is
    its rotary module's business) with **DeepStack**: the vision encoder also hands out
    features from a few of its intermediate layers, one tensor per early decoder layer,
    added to the visual tokens' hidden states after that layer. The encoder sees the whole
    image (no tiles). The MoE variant's experts route each token on its own, so the loop
    computing only some rows of a layer (token reuse) stays exact."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")

    def encoded(self, model: PreTrainedModel, pixels: torch.Tensor, grid_thw: torch.Tensor) -> VisualFeatures:
        return with_deepstack(model.model.get_image_features(pixels, grid_thw))


class Gemma3(Family):
    """Gemma 3: each image is one square of ``mm_tokens_per_image`` tokens (SigLIP patches
    average-pooled) between ``<start_of_image>`` and ``<end_of_image>``. Its decoder
    layers: sandwich norms (after attention, before and after the MLP), q/k norms,
    ``query_pre_attn_scalar`` scaling, sliding-window layers (``layer_types``,
    ``sliding_window``) with their own rotary base beside the global ones, and during a
    prompt the tokens of one image attend to each other both ways (the model's
    ``token_type_ids`` mask); text, the memory prefix and decoded tokens stay causal.

    transformers 5.24's Gemma 3 never applies ``attn_logit_softcapping`` (its attention
    does not pass it on) nor, in the vision-language model, ``final_logit_softcapping``;
    Gemma 3 checkpoints set both to null, and the loop does as the model does. Pan-and-scan
    is off on this path: its crops would be images whose place in the frame token reuse
    cannot know."""

    name = "gemma3"
    adapter = True
    model_types = ("gemma3",)
    processor_kwargs = {"do_pan_and_scan": False}

    @classmethod
    def refusal(cls, config: Any) -> str | None:
        if getattr(config.get_text_config(), "use_bidirectional_attention", False):
            return "a Gemma 3 whose text attends both ways (an embedding model) has no adapter"
        return None

    def encode(self, model: PreTrainedModel, prepared: Prepared) -> VisualFeatures:
        return VisualFeatures(flatten(model.model.get_image_features(prepared.vision["pixel_values"])))

    def tiles(self, prepared: Prepared) -> int:
        """Each image: the encoder sees one at a time."""
        return int(prepared.vision["pixel_values"].shape[0]) if prepared.vision else 0

    def tile_pixels(self, prepared: Prepared, tile: int) -> torch.Tensor:
        return prepared.vision["pixel_values"][tile]

    def encode_tile(self, model: PreTrainedModel, prepared: Prepared, tile: int) -> VisualFeatures:
        pixels = prepared.vision["pixel_values"][tile : tile + 1]
        return VisualFeatures(flatten(model.model.get_image_features(pixels)))

    def token_grids(self, prepared: Prepared) -> list[TokenGrid]:
        """Each image is resized to a square and pooled to a square grid of tokens."""
        side = math.isqrt(int(self.config.mm_tokens_per_image))
        images = int(prepared.vision["pixel_values"].shape[0]) if prepared.vision else 0
        return [TokenGrid(i, (0.0, 0.0, 1.0, 1.0), side, side) for i in range(images)]

    @classmethod
    def layout(cls, model: PreTrainedModel) -> Layout:
        kinds = tuple(str(t) for t in model.config.get_text_config().layer_types)
        return replace(super().layout(model), rotary_kinds=kinds, sandwich=True, images_attend_within=True)


ADAPTERS: tuple[type[Family], ...] = (Qwen2VL, Qwen3VL, Idefics3, Llava, Gemma3, QwenOmni, Qwen3Omni)


def family_for(model_type: str) -> type[Family]:
    """The adapter for ``model_type``, or the generic path (:class:`Family`) for any other
    model transformers loads."""
    return next((f for f in ADAPTERS if model_type in f.model_types), Family)


_LAYOUTS: weakref.WeakKeyDictionary[Any, Layout] = weakref.WeakKeyDictionary()


def layout_of(model: PreTrainedModel) -> Layout:
    """The :class:`Layout` of ``model``'s family (worked out once per loaded model)."""
    layout = _LAYOUTS.get(model)
    if layout is None:
        layout = _LAYOUTS[model] = family_for(str(model.config.model_type)).layout(model)
    return layout

"""How a model family turns (images, messages) into model inputs, and — for the families
with an adapter — how its visual features are computed, which positions the tokens get,
and how its decoder layers differ from Llama's.

Every family goes through the model's own processor and chat template
(:mod:`stream_rt.mllm.models.processors`), into a :class:`Prepared` input whose ``image_mask``
marks the visual tokens. An adapter also computes the visual features that replace them
(:class:`VisualFeatures`), so the language model runs on embeddings in stream_rt's own
layer loop (:mod:`stream_rt.mllm.models.layer_loop`), which consults the family's :class:`Layout`:
the backend times the vision encoder apart from prefill, and the techniques reuse or drop
visual tokens.

Adapters and what they support (a model without one runs on the generic path, where the
backend refuses every technique at load, :func:`~stream_rt.mllm.backends.transformers_backend.inspect_model`):

- Every adapter: token reuse, clip compression, the memory's K/V prefix, the layer exit,
  and tile reuse over the pieces its vision encoder sees each on its own — an image whose
  pixels a cached call saw reuses that call's encoder output exactly (a clip's frames,
  shared by consecutive calls, are encoded once).
- Qwen2-VL / Qwen2.5-VL, Qwen3-VL (and Qwen3-VL-MoE: its experts route each token on its
  own, so computing some rows of a layer is still exact), LLaVA, Gemma 3: the encoder's
  attention never crosses from one image to another, so each image is such a piece (with
  Qwen3-VL's DeepStack rows); Gemma 3's pan-and-scan crops are off on this path.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stream_rt.mllm.models.processors import load_processor
from stream_rt.operators.token_reuse import TokenGrid

Message = dict[str, Any]
TileState = tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]
"""A tile's vision-encoder state: per-layer keys and values, and the last hidden states."""


@dataclass
class Prepared:
    """One request, ready for the model."""

    input_ids: torch.Tensor  # (1, L)
    vision: dict[str, torch.Tensor]  # pixel tensors for the vision encoder
    image_mask: torch.Tensor  # (L,) bool: positions of visual tokens
    position_ids: torch.Tensor | None = None  # None: 0..L-1
    next_position: int = 0  # position id of the first generated token

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class VisualFeatures:
    """A request's visual features, in prompt order (one row per visual token): ``tokens``
    replace the visual tokens' embeddings; ``deepstack`` (Qwen3-VL's DeepStack) holds one
    tensor per early decoder layer, added to the visual tokens' hidden states after that
    layer (:func:`~stream_rt.mllm.models.layer_loop.run_prefill`)."""

    tokens: torch.Tensor  # (visual tokens, hidden size)
    deepstack: tuple[torch.Tensor, ...] = ()  # per layer from the first: (visual tokens, hidden size)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def rows(self, index: torch.Tensor) -> VisualFeatures:
        """The features of the visual tokens ``index`` (the same rows of every tensor)."""
        return VisualFeatures(self.tokens[index], tuple(d[index.to(d.device)] for d in self.deepstack))


@dataclass(frozen=True)
class Layout:
    """How a family's decoder layers differ from Llama's (RMSNorm, rotary attention over
    grouped K/V, MLP; causal), as far as the one layer loop is concerned."""

    windows: tuple[int | None, ...]  # per layer: a sliding layer's window (it sees itself and window - 1 before)
    rotary_kinds: tuple[str, ...] = ()  # per layer, the kind the rotary module takes (own bases); () = one for all
    sandwich: bool = False  # norms after attention and before and after the MLP (Gemma 3)
    images_attend_within: bool = False  # in a prompt, a visual token sees every token of its image (Gemma 3)


class Family:
    """Every model ``AutoModelForImageTextToText`` loads, through its own processor: the
    chat template renders the turn, the processor expands each image into its placeholder
    tokens and pixel tensors. Subclasses are the **adapters** of the families whose layers
    stream_rt runs itself (:mod:`stream_rt.mllm.models.layer_loop`), where the efficiency techniques
    live; the base class alone (``adapter`` false) is the generic path, which calls the
    model's own ``generate``. ``model_types`` are the ``config.model_type`` values an
    adapter handles."""

    name: ClassVar[str] = "generic"
    adapter: ClassVar[bool] = False
    mrope: ClassVar[bool] = False  # position ids carry three axes (M-RoPE), alike for text
    model_types: ClassVar[tuple[str, ...]] = ()
    processor_kwargs: ClassVar[dict[str, Any]] = {}  # passed to the processor with every request

    def __init__(self, path: Path, config: Any, processor: Any = None) -> None:
        self.path = path
        self.config = config
        self.processor = processor if processor is not None else load_processor(path, config.model_type)
        self.tokenizer: PreTrainedTokenizerBase = self.processor.tokenizer
        self.template = str(self.processor.chat_template)
        self.image_token_id = image_token_id(config, self.processor)

    @property
    def eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        generation = getattr(self.config, "eos_token_id", None)
        ids.update(generation if isinstance(generation, list) else [generation])
        for token in ("<|im_end|>", "<end_of_utterance>", "<|endoftext|>", "</s>", "<end_of_turn>", "<eos>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        return {i for i in ids if isinstance(i, int)}

    def render(self, messages: list[Message]) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, add_generation_prompt=True, tokenize=False
        )
        assert isinstance(text, str)
        return text

    def inputs(self, images: list[npt.NDArray[np.uint8]], messages: list[Message]) -> dict[str, torch.Tensor]:
        """What the model's processor makes of one user turn: ``input_ids``,
        ``attention_mask`` and the tensors its vision tower takes."""
        out = self.processor(text=[self.render(messages)], images=[Image.fromarray(i) for i in images] or None,
                             return_tensors="pt", **(self.processor_kwargs if images else {}))  # fmt: skip
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}

    def prepare(self, images: list[npt.NDArray[np.uint8]], messages: list[Message], model: PreTrainedModel) -> Prepared:
        out = self.inputs(images, messages)
        ids = out["input_ids"]
        vision = {k: v for k, v in out.items() if k not in TEXT_INPUTS} if images else {}
        prepared = Prepared(ids, vision, ids[0] == self.image_token_id, None, ids.shape[1])
        return self.positioned(prepared, model)

    @classmethod
    def refusal(cls, config: Any) -> str | None:
        """Why this family cannot run a model of this ``config`` (``None``: it can)."""
        return None

    def positioned(self, prepared: Prepared, model: PreTrainedModel) -> Prepared:
        """``prepared`` with its position ids, where they are not simply 0..L-1."""
        return prepared

    def encode(self, model: PreTrainedModel, prepared: Prepared) -> VisualFeatures:
        """The visual features, (number of visual tokens, hidden size), in prompt order."""
        raise NotImplementedError(f"the {self.name} family has no adapter")

    @classmethod
    def layout(cls, model: PreTrainedModel) -> Layout:
        """How ``model``'s decoder layers run in the layer loop. Here: Llama's, with a
        sliding window wherever a layer's attention has one (Qwen2 with
        ``use_sliding_window``)."""
        layers = model.get_decoder().layers
        return Layout(tuple(getattr(layer.self_attn, "sliding_window", None) for layer in layers))

    def token_grids(self, prepared: Prepared) -> list[TokenGrid]:
        """Which part of which image each visual token covers, in prompt order (for token
        reuse); families without reuse support raise."""
        raise NotImplementedError(f"token reuse does not support the {self.name} family yet")

    partial_encoder: ClassVar[bool] = False  # encode_tile_reusing: a tile's encoder pass recomputes only what moved

    def tiles(self, prepared: Prepared) -> int:
        """How many pieces the vision encoder sees each on its own — tiles of an image, or
        whole images — in prompt order, one token grid each (0: none)."""
        return 0

    def tile_pixels(self, prepared: Prepared, tile: int) -> torch.Tensor:
        """The pixel tensor the encoder takes for ``tile`` (what tile reuse compares)."""
        raise NotImplementedError

    def encode_tile(self, model: PreTrainedModel, prepared: Prepared, tile: int) -> VisualFeatures:
        """The visual features of one tile: exactly its rows of :meth:`encode`'s."""
        raise NotImplementedError

    def encode_tile_reusing(
        self,
        model: PreTrainedModel,
        prepared: Prepared,
        tile: int,
        changed_tokens: torch.Tensor | None,
        state: TileState | None,
        start_layer: int,
    ) -> tuple[torch.Tensor, TileState]:
        """One tile's features, recomputing only the patches under ``changed_tokens``."""
        raise NotImplementedError


TEXT_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"})
"""Processor outputs that follow the prompt's tokens rather than its images."""


def image_token_id(config: Any, processor: Any) -> int:
    """The id of the token each visual feature replaces in the prompt."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    value = getattr(processor, "image_token_id", None)
    if isinstance(value, int):
        return value
    raise ValueError(f"the config of model type '{config.model_type}' names no image token")


class Qwen2VL(Family):
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

    def encoded(self, model: PreTrainedModel, pixels: torch.Tensor, grid_thw: torch.Tensor) -> VisualFeatures:
        """The features of the images whose patch rows are ``pixels`` and grids ``grid_thw``."""
        return VisualFeatures(_flatten(model.model.get_image_features(pixels, grid_thw)))

    def tiles(self, prepared: Prepared) -> int:
        """Each image: the encoder's attention never crosses from one image to another."""
        return int(prepared.vision["image_grid_thw"].shape[0]) if prepared.vision else 0

    def tile_pixels(self, prepared: Prepared, tile: int) -> torch.Tensor:
        sizes = prepared.vision["image_grid_thw"].prod(-1).tolist()
        start = sum(sizes[:tile])
        return prepared.vision["pixel_values"][start : start + sizes[tile]]

    def encode_tile(self, model: PreTrainedModel, prepared: Prepared, tile: int) -> VisualFeatures:
        grid = prepared.vision["image_grid_thw"][tile : tile + 1]
        return self.encoded(model, self.tile_pixels(prepared, tile), grid)

    def token_grids(self, prepared: Prepared) -> list[TokenGrid]:
        grids = prepared.vision["image_grid_thw"].tolist()
        return [
            TokenGrid(i, (0.0, 0.0, 1.0, 1.0), h // self.merge, w // self.merge) for i, (_, h, w) in enumerate(grids)
        ]


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
        return VisualFeatures(_flatten(out))

    partial_encoder = True

    def tiles(self, prepared: Prepared) -> int:
        return int(prepared.vision["pixel_values"].shape[1]) if prepared.vision else 0

    def tile_pixels(self, prepared: Prepared, tile: int) -> torch.Tensor:
        return prepared.vision["pixel_values"][0, tile]

    def encode_tile(self, model: PreTrainedModel, prepared: Prepared, tile: int) -> VisualFeatures:
        mask = prepared.vision.get("pixel_attention_mask")
        pixels = prepared.vision["pixel_values"][:, tile : tile + 1]
        out = model.model.get_image_features(pixels, mask[:, tile : tile + 1] if mask is not None else None)
        return VisualFeatures(_flatten(out))

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
        rows = everything
        partial = changed_tokens is not None and state is not None
        if partial:
            assert changed_tokens is not None
            side = round(changed_tokens.numel() ** 0.5)
            scale = per_side // side
            patch_changed = changed_tokens.view(side, side).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
            changed = everything[patch_changed.flatten().to(hidden.device)]
        keys, values = [], []
        for index, layer in enumerate(vision.encoder.layers):
            if partial and index == start_layer:
                hidden, rows = hidden[:, changed], changed
            attn = layer.self_attn
            x = layer.layer_norm1(hidden)
            shape = (1, len(rows), attn.num_heads, attn.head_dim)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            if len(rows) != len(everything):
                assert state is not None
                k_full, v_full = state[0][index].clone(), state[1][index].clone()
                k_full[:, :, rows], v_full[:, :, rows] = k, v
                k, v = k_full, v_full
            keys.append(k)
            values.append(v)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scale)
            hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(1, len(rows), -1))
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
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
        return VisualFeatures(_flatten(out))

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
        out = model.model.get_image_features(pixels, grid_thw)
        deepstack = tuple(torch.cat([f.reshape(-1, f.shape[-1]) for f in layer]) for layer in out.deepstack_features)
        return VisualFeatures(_flatten(out), deepstack)


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
        return VisualFeatures(_flatten(model.model.get_image_features(prepared.vision["pixel_values"])))

    def tiles(self, prepared: Prepared) -> int:
        """Each image: the encoder sees one at a time."""
        return int(prepared.vision["pixel_values"].shape[0]) if prepared.vision else 0

    def tile_pixels(self, prepared: Prepared, tile: int) -> torch.Tensor:
        return prepared.vision["pixel_values"][tile]

    def encode_tile(self, model: PreTrainedModel, prepared: Prepared, tile: int) -> VisualFeatures:
        pixels = prepared.vision["pixel_values"][tile : tile + 1]
        return VisualFeatures(_flatten(model.model.get_image_features(pixels)))

    def token_grids(self, prepared: Prepared) -> list[TokenGrid]:
        """Each image is resized to a square and pooled to a square grid of tokens."""
        side = math.isqrt(int(self.config.mm_tokens_per_image))
        images = int(prepared.vision["pixel_values"].shape[0]) if prepared.vision else 0
        return [TokenGrid(i, (0.0, 0.0, 1.0, 1.0), side, side) for i in range(images)]

    @classmethod
    def layout(cls, model: PreTrainedModel) -> Layout:
        kinds = tuple(str(t) for t in model.config.get_text_config().layer_types)
        return replace(super().layout(model), rotary_kinds=kinds, sandwich=True, images_attend_within=True)


ADAPTERS: tuple[type[Family], ...] = (Qwen2VL, Qwen3VL, Idefics3, Llava, Gemma3)


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


def _flatten(out: Any) -> torch.Tensor:
    """Visual features as (tokens, hidden), from whatever ``get_image_features`` returns
    (a tensor, a list per image, or an output object with ``pooler_output``)."""
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(features, list | tuple):
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])

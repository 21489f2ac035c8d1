"""What differs between the supported model families: how images become pixel tensors
and placeholder tokens, how the prompt is templated, how visual features are computed and
which positions the tokens get.

Each :class:`Family` turns (images, messages) into a :class:`Prepared` input whose
``image_mask`` marks the visual tokens, and computes the visual features that replace
them. The language model then runs on embeddings, so the backend can time the vision
encoder apart from prefill, and later stages can reuse or drop visual tokens.

Processors are assembled from the model directory's tokenizer, image processor settings
(the PIL implementation, which needs no torchvision) and chat template, so every family
loads the same way for a real checkpoint and for the smoke model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

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


class Family:
    """Base of the family adapters. ``model_types`` are the ``config.model_type`` values
    it handles."""

    name: ClassVar[str]
    mrope: ClassVar[bool] = False  # position ids carry three axes (M-RoPE), alike for text
    model_types: ClassVar[tuple[str, ...]]
    default_template: ClassVar[str]

    def __init__(self, path: Path, config: Any) -> None:
        self.path = path
        self.config = config
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(path))
        self.template = _chat_template(path, self.tokenizer) or self.default_template

    @property
    def eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        for token in ("<|im_end|>", "<end_of_utterance>", "<|endoftext|>", "</s>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        return {i for i in ids if i is not None}

    def render(self, messages: list[Message]) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, add_generation_prompt=True, tokenize=False
        )
        assert isinstance(text, str)
        return text

    def prepare(self, images: list[npt.NDArray[np.uint8]], messages: list[Message], model: PreTrainedModel) -> Prepared:
        raise NotImplementedError

    def encode(self, model: PreTrainedModel, prepared: Prepared) -> torch.Tensor:
        """The visual features, (number of visual tokens, hidden size), in prompt order."""
        raise NotImplementedError

    def token_grids(self, prepared: Prepared) -> list[TokenGrid]:
        """Which part of which image each visual token covers, in prompt order (for token
        reuse); families without reuse support raise."""
        raise NotImplementedError(f"token reuse does not support the {self.name} family yet")

    def tiles(self, prepared: Prepared) -> int:
        """How many independently encoded tiles the images were cut into (0: not tiled)."""
        return 0

    def encode_tile(self, model: PreTrainedModel, prepared: Prepared, tile: int) -> torch.Tensor:
        """The visual features of one tile (the tile's tokens, hidden size)."""
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


class Qwen2VL(Family):
    """Qwen2-VL and Qwen2.5-VL: dynamic resolution, 2x2 patch merge, M-RoPE positions."""

    name = "qwen2_vl"
    mrope = True
    model_types = ("qwen2_vl", "qwen2_5_vl")
    default_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
        "<|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    def __init__(self, path: Path, config: Any) -> None:
        super().__init__(path, config)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
        self.image_token_id = int(config.image_token_id)
        self.merge = int(config.vision_config.spatial_merge_size)

    def prepare(self, images: list[npt.NDArray[np.uint8]], messages: list[Message], model: PreTrainedModel) -> Prepared:
        text = self.render(messages)
        vision: dict[str, torch.Tensor] = {}
        if images:
            out = self.image_processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")
            vision = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
            pieces = text.split("<|image_pad|>")
            if len(pieces) != len(images) + 1:
                raise ValueError(f"the prompt has {len(pieces) - 1} image placeholders for {len(images)} images")
            counts = (out["image_grid_thw"].prod(-1) // self.merge**2).tolist()
            text = pieces[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:], strict=True))
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        mask = ids[0] == self.image_token_id
        if not images:
            return Prepared(ids, vision, mask, None, ids.shape[1])
        position_ids, _ = model.model.get_rope_index(
            ids, mask[None].int(), image_grid_thw=vision["image_grid_thw"], attention_mask=torch.ones_like(ids)
        )
        return Prepared(ids, vision, mask, position_ids, int(position_ids.max()) + 1)

    def encode(self, model: PreTrainedModel, prepared: Prepared) -> torch.Tensor:
        return _flatten(
            model.model.get_image_features(prepared.vision["pixel_values"], prepared.vision["image_grid_thw"])
        )

    def token_grids(self, prepared: Prepared) -> list[TokenGrid]:
        grids = prepared.vision["image_grid_thw"].tolist()
        return [
            TokenGrid(i, (0.0, 0.0, 1.0, 1.0), h // self.merge, w // self.merge) for i, (_, h, w) in enumerate(grids)
        ]


class Idefics3(Family):
    """SmolVLM and Idefics3: the image is split into tiles plus a downscaled global view;
    each tile is encoded on its own and pixel-shuffled into ``image_seq_len`` tokens."""

    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    default_template = (
        "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}"
        "{% if m['content'] is string %}: {{ m['content'] }}{% else %}:{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    )

    def __init__(self, path: Path, config: Any) -> None:
        super().__init__(path, config)
        from transformers import Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        vision = config.vision_config
        seq_len = int((vision.image_size // vision.patch_size) ** 2 / config.scale_factor**2)
        self.processor = Idefics3Processor(
            image_processor=Idefics3ImageProcessorPil.from_pretrained(str(path)),
            tokenizer=self.tokenizer,
            image_seq_len=seq_len,
        )
        self.image_token_id = int(config.image_token_id)

    def prepare(self, images: list[npt.NDArray[np.uint8]], messages: list[Message], model: PreTrainedModel) -> Prepared:
        text = self.render(messages)
        pil = [Image.fromarray(i) for i in images]
        out = self.processor(text=[text], images=[pil] if pil else None, return_tensors="pt")
        ids = out["input_ids"]
        vision = {k: out[k] for k in ("pixel_values", "pixel_attention_mask") if k in out}
        return Prepared(ids, vision, ids[0] == self.image_token_id, None, ids.shape[1])

    def encode(self, model: PreTrainedModel, prepared: Prepared) -> torch.Tensor:
        out = model.model.get_image_features(
            prepared.vision["pixel_values"], prepared.vision.get("pixel_attention_mask")
        )
        return _flatten(out)

    def tiles(self, prepared: Prepared) -> int:
        return int(prepared.vision["pixel_values"].shape[1]) if prepared.vision else 0

    def encode_tile(self, model: PreTrainedModel, prepared: Prepared, tile: int) -> torch.Tensor:
        mask = prepared.vision.get("pixel_attention_mask")
        pixels = prepared.vision["pixel_values"][:, tile : tile + 1]
        return _flatten(model.model.get_image_features(pixels, mask[:, tile : tile + 1] if mask is not None else None))

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
        side = round(self.processor.image_seq_len**0.5)
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
    model_types = ("llava",)
    default_template = (
        "{% for m in messages %}{{ m['role'] | upper }}: {% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}"
        "{% endif %}{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )

    def __init__(self, path: Path, config: Any) -> None:
        super().__init__(path, config)
        from transformers import LlavaProcessor
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        self.processor = LlavaProcessor(
            image_processor=LlavaImageProcessorPil.from_pretrained(str(path)),
            tokenizer=self.tokenizer,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1 if config.vision_feature_select_strategy == "default" else 0,
        )
        self.image_token_id = int(config.image_token_id)

    def prepare(self, images: list[npt.NDArray[np.uint8]], messages: list[Message], model: PreTrainedModel) -> Prepared:
        text = self.render(messages)
        out = self.processor(text=[text], images=[Image.fromarray(i) for i in images] or None, return_tensors="pt")
        ids = out["input_ids"]
        vision = {"pixel_values": out["pixel_values"]} if "pixel_values" in out else {}
        return Prepared(ids, vision, ids[0] == self.image_token_id, None, ids.shape[1])

    def encode(self, model: PreTrainedModel, prepared: Prepared) -> torch.Tensor:
        out = model.model.get_image_features(
            prepared.vision["pixel_values"],
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        return _flatten(out)


FAMILIES: tuple[type[Family], ...] = (Qwen2VL, Idefics3, Llava)


def family_for(model_type: str) -> type[Family]:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"model type '{model_type}' is not supported (supported: {known})")


def _flatten(out: Any) -> torch.Tensor:
    """Visual features as (tokens, hidden), from whatever ``get_image_features`` returns
    (a tensor, a list per image, or an output object with ``pooler_output``)."""
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(features, list | tuple):
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])


def _chat_template(path: Path, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The model's own chat template: chat_template.jinja, chat_template.json, or the
    tokenizer's."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    js = path / "chat_template.json"
    if js.is_file():
        template = json.loads(js.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None

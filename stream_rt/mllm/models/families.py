"""How a model family turns (images, messages) into model inputs, and — for the families
with an adapter — how its visual features are computed, which positions the tokens get,
and how its decoder layers differ from Llama's.

Every family goes through the model's own processor and chat template
(:mod:`stream_rt.mllm.models.processors`), into a :class:`Prepared` input whose ``image_mask``
marks the visual tokens. An adapter also computes the visual features that replace them
(:class:`VisualFeatures`), so the language model runs on embeddings in stream_rt's own
layer loop (:mod:`stream_rt.mllm.models.decoder`), which consults the family's :class:`Layout`:
the backend times the vision encoder apart from prefill, and the techniques reuse or drop
visual tokens.
The adapters, and the families that stay on the generic path, are in
:mod:`stream_rt.mllm.models.adapters`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stream_rt.graph.packets import AUDIO_SAMPLE_RATE
from stream_rt.mllm.models.processors import load_processor
from stream_rt.operators.token_reuse import TokenGrid

Message = dict[str, Any]
Sound = npt.NDArray[np.float32]
"""A clip's sound: mono samples in [-1, 1] at :data:`~stream_rt.graph.packets.AUDIO_SAMPLE_RATE`."""

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
    audio_mask: torch.Tensor | None = None  # (L,) bool: positions of audio tokens (a model that hears); None: none

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class VisualFeatures:
    """A request's visual features, in prompt order (one row per visual token): ``tokens``
    replace the visual tokens' embeddings; ``deepstack`` (Qwen3-VL's DeepStack) holds one
    tensor per early decoder layer, added to the visual tokens' hidden states after that
    layer (:func:`~stream_rt.mllm.models.decoder.run_prefill`)."""

    tokens: torch.Tensor  # (visual tokens, hidden size)
    deepstack: tuple[torch.Tensor, ...] = ()  # per layer from the first: (visual tokens, hidden size)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def rows(self, index: torch.Tensor) -> VisualFeatures:
        """The features of the visual tokens ``index`` (the same rows of every tensor)."""
        return VisualFeatures(self.tokens[index], tuple(d[index.to(d.device)] for d in self.deepstack))


@dataclass
class HeardFeatures:
    """A request's audio features, in prompt order (one row per audio token), and what
    audio-guided compression takes its guidance from: the attention each token received
    in the audio encoder's last layer, and its time in the clip."""

    tokens: torch.Tensor  # (audio tokens, hidden size): replace the audio tokens' embeddings
    attention: torch.Tensor  # (audio tokens,): attention received in the encoder's last layer, head-averaged
    offsets_ns: torch.Tensor  # (audio tokens,) int64: each token's start after the sound's first sample

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def rows(self, index: torch.Tensor) -> HeardFeatures:
        """The features of the audio tokens ``index``."""
        return HeardFeatures(self.tokens[index], self.attention[index.to(self.attention.device)],
                             self.offsets_ns[index.to(self.offsets_ns.device)])  # fmt: skip


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
    stream_rt runs itself (:mod:`stream_rt.mllm.models.decoder`), where the efficiency techniques
    live; the base class alone (``adapter`` false) is the generic path, which calls the
    model's own ``generate``. ``model_types`` are the ``config.model_type`` values an
    adapter handles."""

    name: ClassVar[str] = "generic"
    adapter: ClassVar[bool] = False
    hears: ClassVar[bool] = False  # the model takes audio: a clip's sound goes to it (:meth:`hear`)
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

    def inputs(
        self, images: list[npt.NDArray[np.uint8]], messages: list[Message], sound: Sound | None = None
    ) -> dict[str, torch.Tensor]:
        """What the model's processor makes of one user turn: ``input_ids``,
        ``attention_mask`` and the tensors its vision tower takes (and, with ``sound`` —
        16 kHz mono samples, for a family that :attr:`hears` — its audio encoder's)."""
        heard = {"audio": [sound], "sampling_rate": AUDIO_SAMPLE_RATE} if sound is not None else {}
        out = self.processor(text=[self.render(messages)], images=[Image.fromarray(i) for i in images] or None,
                             return_tensors="pt", **(self.processor_kwargs if images else {}), **heard)  # fmt: skip
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}

    def prepare(
        self,
        images: list[npt.NDArray[np.uint8]],
        messages: list[Message],
        model: PreTrainedModel,
        sound: Sound | None = None,
    ) -> Prepared:
        out = self.inputs(images, messages, sound)
        ids = out["input_ids"]
        vision = {k: v for k, v in out.items() if k not in TEXT_INPUTS} if images or sound is not None else {}
        prepared = Prepared(ids, vision, ids[0] == self.image_token_id, None, ids.shape[1])
        return self.positioned(prepared, model)

    def hear(self, model: PreTrainedModel, prepared: Prepared) -> HeardFeatures | None:
        """The audio features of ``prepared``'s sound (``None``: it has none, or the family
        does not hear)."""
        return None

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

    def image_rows(self, prepared: Prepared, image: int, images: int) -> torch.Tensor:
        """Indices of ``image``'s rows among the ``images`` images' visual features (in
        prompt order); a family without a mapped grid gives each image an equal share."""
        try:
            grids = self.token_grids(prepared)
        except NotImplementedError:
            n = int(prepared.image_mask.sum()) // images
            return torch.arange(image * n, (image + 1) * n)
        rows, offset = [], 0
        for grid in grids:
            if grid.image == image:
                rows.append(torch.arange(offset, offset + grid.size))
            offset += grid.size
        return torch.cat(rows)

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


def flatten(out: Any) -> torch.Tensor:
    """Features as (tokens, hidden), from whatever ``get_image_features`` (or
    ``get_audio_features``) returns (a tensor, a list per image, or an output object with
    ``pooler_output``)."""
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(features, list | tuple):
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])


def with_deepstack(out: Any) -> VisualFeatures:
    """The features a Qwen3-VL-style ``get_image_features`` returned, with its DeepStack
    layers' (one tensor per layer, rows in prompt order)."""
    deepstack = tuple(torch.cat([f.reshape(-1, f.shape[-1]) for f in layer]) for layer in out.deepstack_features)
    return VisualFeatures(flatten(out), deepstack)


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


class QwenImageGrids:
    """Qwen's vision tower, for the families that share it (Qwen2/2.5/3-VL, the Omni
    thinkers): images of any size, each a tile of its own (the encoder's attention never
    crosses from one image to another), its patches merged ``merge`` x ``merge`` into tokens."""

    merge: int

    def encoded(self, model: PreTrainedModel, pixels: torch.Tensor, grid_thw: torch.Tensor) -> VisualFeatures:
        """The features of the images whose patch rows are ``pixels`` and grids ``grid_thw``."""
        return VisualFeatures(flatten(model.model.get_image_features(pixels, grid_thw)))

    def tiles(self, prepared: Prepared) -> int:
        grid = prepared.vision.get("image_grid_thw")
        return int(grid.shape[0]) if grid is not None else 0

    def tile_pixels(self, prepared: Prepared, tile: int) -> torch.Tensor:
        sizes = prepared.vision["image_grid_thw"].prod(-1).tolist()
        start = sum(sizes[:tile])
        return prepared.vision["pixel_values"][start : start + sizes[tile]]

    def encode_tile(self, model: PreTrainedModel, prepared: Prepared, tile: int) -> VisualFeatures:
        grid = prepared.vision["image_grid_thw"][tile : tile + 1]
        return self.encoded(model, self.tile_pixels(prepared, tile), grid)

    def token_grids(self, prepared: Prepared) -> list[TokenGrid]:
        grid = prepared.vision.get("image_grid_thw")
        grids = grid.tolist() if grid is not None else []
        return [
            TokenGrid(i, (0.0, 0.0, 1.0, 1.0), h // self.merge, w // self.merge) for i, (_, h, w) in enumerate(grids)
        ]

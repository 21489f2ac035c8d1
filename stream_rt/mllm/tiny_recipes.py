"""The recipes of :mod:`stream_rt.mllm.tiny_models`: per vision-language family, only what
differs from its config class's defaults — its special tokens, its chat template, the
config fields naming the image tokens, and how small its image processor's images are —
at two sizes (``"tiny"`` for tests, ``"realistic"`` shaped like the family's small
checkpoints)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Size = Literal["tiny", "realistic"]
Ids = dict[str, int]
"""Special token -> id in the built tokenizer."""

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _chatml(image: str) -> str:
    return _CHATML.replace("IMAGE", image)


@dataclass(frozen=True)
class Recipe:
    """What a family's tiny model needs besides its config class's defaults."""

    specials: dict[str, str]  # tokenizer attribute -> token (image_token, boi_token, ...)
    others: tuple[str, ...]  # further special tokens
    eos: str
    template: str
    config: Callable[[Ids, Size], dict[str, Any]]  # config kwargs from the tokens' ids
    image_processor: Callable[[Size], dict[str, Any]]  # the image processor's settings
    processor: Callable[[Size], dict[str, Any]] = field(default=lambda size: {})  # processor_config.json
    bos: str | None = None
    feature_extractor: Callable[[Size], dict[str, Any]] | None = None  # a model that takes audio: Whisper's settings


def _text(size: Size, **extra: Any) -> dict[str, Any]:
    """A decoder's dimensions: tiny, or about SmolLM2-360M's (~250-400M with the vision tower)."""
    dims = (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16}
        if size == "tiny"
        else {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 28, "num_attention_heads": 15,
              "num_key_value_heads": 5, "head_dim": 64}
    )  # fmt: skip
    return dims | {"max_position_embeddings": 8192, "tie_word_embeddings": True} | extra


def _siglip(size: Size, image_size: int, patch_size: int, **extra: Any) -> dict[str, Any]:
    dims = (
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
        if size == "tiny"
        else {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
    )
    return dims | {"image_size": image_size, "patch_size": patch_size} | extra


def _mrope_section(text: dict[str, Any]) -> list[int]:
    """M-RoPE's split of the rotary half into time, height and width (about 1:1.5:1.5)."""
    half = text["head_dim"] // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _qwen2_vl(ids: Ids, size: Size) -> dict[str, Any]:
    text = _text(size)
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(text)}
    vision = (
        {"depth": 2, "embed_dim": 32, "num_heads": 2}
        if size == "tiny"
        else {"depth": 12, "embed_dim": 768, "num_heads": 12}
    )
    return {
        "text_config": text | {"rope_parameters": rope},
        "vision_config": vision | {"hidden_size": text["hidden_size"], "mlp_ratio": 4, "patch_size": 14,
                                   "spatial_merge_size": 2, "temporal_patch_size": 2},
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
    }  # fmt: skip


def _qwen2_5_vl(ids: Ids, size: Size) -> dict[str, Any]:
    config = _qwen2_vl(ids, size)
    vision = config["vision_config"]
    tiny = size == "tiny"
    config["vision_config"] = {
        "depth": vision["depth"], "hidden_size": vision["embed_dim"], "num_heads": vision["num_heads"],
        "intermediate_size": 4 * vision["embed_dim"], "out_hidden_size": config["text_config"]["hidden_size"],
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56 if tiny else 112,
        "fullatt_block_indexes": [1] if tiny else [3, 7, 11],
    }  # fmt: skip
    return config


def _qwen3_vl(ids: Ids, size: Size) -> dict[str, Any]:
    """Realistic: Qwen3-VL-2B's 28 decoder layers and vocabulary, narrower (960 wide, ~0.5B
    with a ViT-B-sized vision tower feeding 3 DeepStack levels)."""
    config = _qwen2_vl(ids, size)
    tiny = size == "tiny"
    text = config["text_config"]
    text["rope_parameters"] |= {"mrope_interleaved": True}
    config["vision_config"] = {
        "depth": 3 if tiny else 12, "hidden_size": 32 if tiny else 768, "num_heads": 2 if tiny else 12,
        "intermediate_size": 64 if tiny else 3072, "out_hidden_size": text["hidden_size"], "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64 if tiny else 2304,
        "deepstack_visual_indexes": [0, 1, 2] if tiny else [3, 6, 9],
    }  # fmt: skip
    text["tie_word_embeddings"] = True
    return config


def _qwen2_5_omni_thinker(ids: Ids, size: Size) -> dict[str, Any]:
    """Qwen2.5-Omni's thinker: Qwen2.5-VL's vision tower and decoder (its text config has no
    head_dim: hidden / heads) with a Whisper-style audio encoder (128 mel bins, attention
    within windows of ``2 * n_window`` mel frames, 25 tokens a second). Realistic: about
    Qwen2.5-Omni-3B's decoder depth, narrower, with a small audio encoder."""
    tiny = size == "tiny"
    names = ("<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>")
    config = _qwen2_5_vl(dict(zip(("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"),
                                  (ids[n] for n in names), strict=True)), size)  # fmt: skip
    text = config["text_config"]
    text.pop("head_dim")
    audio = (
        {"encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "d_model": 32, "n_window": 50}
        if tiny
        else {"encoder_layers": 12, "encoder_attention_heads": 8, "encoder_ffn_dim": 2048, "d_model": 512,
              "n_window": 100}
    )  # fmt: skip
    for key in ("image_token_id", "video_token_id"):
        config[key.replace("_id", "_index")] = config.pop(key)
    return config | {
        "audio_config": audio | {"num_mel_bins": 128, "output_dim": text["hidden_size"], "max_source_positions": 1500,
                                 **({"initializer_range": 0.5} if tiny else {})},
        "audio_token_index": ids["<|AUDIO|>"], "audio_start_token_id": ids["<|audio_bos|>"],
        "audio_end_token_id": ids["<|audio_eos|>"],
    }  # fmt: skip


def _qwen3_omni_moe_thinker(ids: Ids, size: Size) -> dict[str, Any]:
    """Qwen3-Omni's thinker: Qwen3-VL's vision tower (DeepStack) before a Qwen3-MoE decoder
    (q/k norms, experts routing each token, interleaved M-RoPE), with an audio encoder of
    three stride-2 2-D convolutions over 100-frame windows (13 tokens a second of sound).
    Realistic: Qwen3-VL's realistic decoder (28 layers, 960 wide) with 8 experts of which 2
    route each token, and a small audio encoder (~0.5B in all)."""
    tiny = size == "tiny"
    names = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    config = _qwen3_vl({n: ids[n] for n in names}, size)
    text = config["text_config"]
    text.pop("head_dim")  # (the thinker's text config has none: hidden / heads)
    text |= {"num_experts": 4 if tiny else 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32 if tiny else 384,
             "decoder_sparse_step": 1}  # fmt: skip
    audio = (
        {"encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "d_model": 32,
         "downsample_hidden_size": 8}
        if tiny
        else {"encoder_layers": 12, "encoder_attention_heads": 8, "encoder_ffn_dim": 2048, "d_model": 512,
              "downsample_hidden_size": 128}
    )  # fmt: skip
    return config | {
        "audio_config": audio | {"num_mel_bins": 128, "output_dim": text["hidden_size"], "n_window": 50,
                                 "max_source_positions": 1500, **({"initializer_range": 0.5} if tiny else {})},
        "audio_token_id": ids["<|audio_pad|>"], "audio_start_token_id": ids["<|audio_start|>"],
        "audio_end_token_id": ids["<|audio_end|>"],
    }  # fmt: skip


def _idefics3(ids: Ids, size: Size) -> dict[str, Any]:
    tiny = size == "tiny"
    return {
        "text_config": {"model_type": "llama", **_text(size)},
        "vision_config": _siglip(size, 64 if tiny else 512, 16),
        "scale_factor": 2 if tiny else 4, "image_token_id": ids["<image>"],
    }  # fmt: skip


def _llava(ids: Ids, size: Size) -> dict[str, Any]:
    tiny = size == "tiny"
    vision = _siglip(size, 64 if tiny else 336, 16 if tiny else 14) | {"projection_dim": 32 if tiny else 512}
    return {
        "text_config": {"model_type": "llama", **_text(size)},
        "vision_config": {"model_type": "clip_vision_model", **vision},
        "image_token_index": ids["<image>"], "vision_feature_layer": -1,
    }  # fmt: skip


def _llava_onevision(ids: Ids, size: Size) -> dict[str, Any]:
    tiny = size == "tiny"
    side = 64 if tiny else 384
    return {
        "text_config": {"model_type": "qwen2", **_text(size)},
        "vision_config": {"model_type": "siglip_vision_model", **_siglip(size, side, 16 if tiny else 14)},
        "image_token_index": ids["<image>"], "video_token_index": ids["<video>"],
        "image_grid_pinpoints": [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]],
        "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_4",
    }  # fmt: skip


def _gemma3(ids: Ids, size: Size) -> dict[str, Any]:
    """Realistic: Gemma 3 270M's decoder (18 layers, 640 wide, one K/V head of 256, five
    sliding layers of 512 to one global) and vocabulary, with a SigLIP-B/14 vision tower at
    448 px pooled to Gemma 3's 256 tokens an image (~0.4B)."""
    tiny = size == "tiny"
    # The tiny one: a window shorter than any prompt, a query scale other than 1/sqrt(head_dim).
    text = (
        _text(size) | {"sliding_window": 16, "query_pre_attn_scalar": 32,
                       "layer_types": ["sliding_attention"] * 3 + ["full_attention"]}
        if tiny
        else {"hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
              "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
              "max_position_embeddings": 32768, "tie_word_embeddings": True,
              "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3}
    )  # fmt: skip
    return {
        "text_config": text, "vision_config": _siglip(size, 64 if tiny else 448, 16 if tiny else 14),
        "mm_tokens_per_image": 4 if tiny else 256, "boi_token_index": ids["<start_of_image>"],
        "eoi_token_index": ids["<end_of_image>"], "image_token_index": ids["<image_soft_token>"],
    }  # fmt: skip


def _internvl(ids: Ids, size: Size) -> dict[str, Any]:
    tiny = size == "tiny"
    vision = _siglip(size, 64 if tiny else 448, 16 if tiny else 14)
    side = vision.pop("image_size")
    patch = vision.pop("patch_size")
    return {
        "text_config": {"model_type": "qwen2", **_text(size)},
        "vision_config": vision | {"image_size": [side, side], "patch_size": [patch, patch]},
        "image_token_id": ids["<IMG_CONTEXT>"], "image_seq_length": (side // patch) ** 2 // 4,
    }  # fmt: skip


def _mistral3(ids: Ids, size: Size) -> dict[str, Any]:
    tiny = size == "tiny"
    vision = (
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 16}
        if tiny
        else {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
              "head_dim": 64}
    )  # fmt: skip
    return {
        "text_config": {"model_type": "mistral", **_text(size)},
        "vision_config": {"model_type": "pixtral", **vision, "image_size": 64 if tiny else 512, "patch_size": 16},
        "image_token_index": ids["[IMG]"], "spatial_merge_size": 2,
    }  # fmt: skip


def _lfm2_vl(ids: Ids, size: Size) -> dict[str, Any]:
    tiny = size == "tiny"
    text = _text(size)
    text["layer_types"] = ["conv", "full_attention"] * (text["num_hidden_layers"] // 2)
    text.pop("head_dim")
    return {
        "text_config": {"model_type": "lfm2", **text},
        "vision_config": {"model_type": "siglip2_vision_model", **_siglip(size, 0, 16), "num_patches": 256},
        "image_token_id": ids["<image>"], "projector_hidden_size": 64 if tiny else 2560, "downsample_factor": 2,
    }  # fmt: skip


def _qwen2_processor(size: Size) -> dict[str, Any]:
    side = 112 if size == "tiny" else 448  # at most 16 (tiny) or ~256 visual tokens
    return {"min_pixels": 56 * 56, "max_pixels": side * side}


def _qwen3_processor(size: Size) -> dict[str, Any]:
    side = 128 if size == "tiny" else 448  # realistic: a 4:3 camera frame -> 192 visual tokens
    return {"size": {"shortest_edge": 64 * 64, "longest_edge": side * side}, "patch_size": 16, "merge_size": 2}


def _square(side_tiny: int, side: int) -> Callable[[Size], dict[str, Any]]:
    def settings(size: Size) -> dict[str, Any]:
        s = side_tiny if size == "tiny" else side
        return {"size": {"height": s, "width": s}}

    return settings


_QWEN_SPECIALS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                  "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}  # fmt: skip
_OMNI_SPECIALS = {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
                  "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                  "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}  # fmt: skip
_OMNI_TEMPLATE = _chatml("<|vision_bos|><|IMAGE|><|vision_eos|>{% elif c['type'] == 'audio' %}"
                         "<|audio_bos|><|AUDIO|><|audio_eos|>")  # fmt: skip
_QWEN3_OMNI_SPECIALS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": "<|audio_pad|>",
                        "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
                        "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"}  # fmt: skip
_QWEN3_OMNI_TEMPLATE = _chatml("<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'audio' %}"
                               "<|audio_start|><|audio_pad|><|audio_end|>")  # fmt: skip
_IDEFICS_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}"
    "{% if m['content'] is string %}: {{ m['content'] }}{% else %}:{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
_IDEFICS_OTHERS = ("<|im_start|>", "<fake_token_around_image>", "<global-img>",
                   *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)))  # fmt: skip


def _idefics_processor(size: Size) -> dict[str, Any]:
    tile = 64 if size == "tiny" else 512
    return {"size": {"longest_edge": 2 * tile}, "max_image_size": {"longest_edge": tile}, "do_image_splitting": True}


def _idefics_seq(size: Size) -> dict[str, Any]:
    return {"image_seq_len": 4 if size == "tiny" else 64}


# fmt: off
RECIPES: dict[str, Recipe] = {
    "qwen2_vl": Recipe(_QWEN_SPECIALS, ("<|im_start|>", "<|endoftext|>"), "<|im_end|>",
                       _chatml("<|vision_start|><|image_pad|><|vision_end|>"), _qwen2_vl, _qwen2_processor),
    "qwen2_5_vl": Recipe(_QWEN_SPECIALS, ("<|im_start|>", "<|endoftext|>"), "<|im_end|>",
                         _chatml("<|vision_start|><|image_pad|><|vision_end|>"), _qwen2_5_vl, _qwen2_processor),
    "qwen3_vl": Recipe(_QWEN_SPECIALS, ("<|im_start|>", "<|endoftext|>"), "<|im_end|>",
                       _chatml("<|vision_start|><|image_pad|><|vision_end|>"), _qwen3_vl, _qwen3_processor),
    "qwen2_5_omni_thinker": Recipe(
        _OMNI_SPECIALS, ("<|im_start|>", "<|endoftext|>"), "<|im_end|>", _OMNI_TEMPLATE, _qwen2_5_omni_thinker,
        _qwen2_processor, feature_extractor=lambda size: {"feature_size": 128},
    ),
    "qwen3_omni_moe_thinker": Recipe(
        _QWEN3_OMNI_SPECIALS, ("<|im_start|>", "<|endoftext|>"), "<|im_end|>", _QWEN3_OMNI_TEMPLATE,
        _qwen3_omni_moe_thinker, _qwen3_processor, feature_extractor=lambda size: {"feature_size": 128},
    ),
    "idefics3": Recipe({"image_token": "<image>"}, _IDEFICS_OTHERS, "<end_of_utterance>", _IDEFICS_TEMPLATE,
                       _idefics3, _idefics_processor, _idefics_seq),
    "smolvlm": Recipe({"image_token": "<image>"}, (*_IDEFICS_OTHERS, "<video>"), "<end_of_utterance>",
                      _IDEFICS_TEMPLATE, _idefics3, _idefics_processor, _idefics_seq),
    "llava": Recipe(
        {"image_token": "<image>"}, ("<unk>", "<pad>"), "</s>",
        "{% for m in messages %}{{ m['role'] | upper }}: {% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}"
        "{% endif %}{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}",
        _llava, lambda size: {"size": {"shortest_edge": 64 if size == "tiny" else 336},
                              "crop_size": {"height": 64 if size == "tiny" else 336,
                                            "width": 64 if size == "tiny" else 336}},
        lambda size: {"patch_size": 16 if size == "tiny" else 14, "vision_feature_select_strategy": "default",
                      "num_additional_image_tokens": 1},
        bos="<s>",
    ),
    "llava_onevision": Recipe(
        {"image_token": "<image>", "video_token": "<video>"}, ("<|im_start|>", "<|endoftext|>"), "<|im_end|>",
        _chatml("<image>\n"), _llava_onevision,
        lambda size: {"size": {"height": 64 if size == "tiny" else 384, "width": 64 if size == "tiny" else 384},
                      "image_grid_pinpoints": _llava_onevision({"<image>": 0, "<video>": 0}, size)[
                          "image_grid_pinpoints"]},
        lambda size: {"num_image_tokens": 16 if size == "tiny" else 729, "vision_feature_select_strategy": "full",
                      "vision_aspect_ratio": "anyres_max_4"},
    ),
    "gemma3": Recipe(
        {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"},
        ("<pad>", "<start_of_turn>"), "<end_of_turn>",
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
        "\n{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        _gemma3, _square(64, 448), lambda size: {"image_seq_length": 4 if size == "tiny" else 256}, bos="<bos>",
    ),
    "internvl": Recipe(
        {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
         "video_token": "<video>"},
        ("<|im_start|>", "<|endoftext|>"), "<|im_end|>", _chatml("<IMG_CONTEXT>\n"), _internvl,
        lambda size: {**_square(64, 448)(size), "crop_to_patches": False},
        lambda size: {"image_seq_length": 4 if size == "tiny" else 256},
    ),
    "mistral3": Recipe(
        {}, ("[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"), "</s>",
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST]{% if m['content'] is string %}"
        "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}[IMG]{% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}[/INST]{% else %}{{ m['content'] }}</s>{% endif %}"
        "{% endfor %}",
        _mistral3, lambda size: {"size": {"longest_edge": 64 if size == "tiny" else 512},
                                 "patch_size": {"height": 16, "width": 16}},
        lambda size: {"patch_size": 16, "spatial_merge_size": 2},
        bos="<s>",
    ),
    "lfm2_vl": Recipe(
        {"image_token": "<image>", "image_start_token": "<|image_start|>", "image_end_token": "<|image_end|>",
         "image_thumbnail_token": "<|img_thumbnail|>"},
        ("<|im_start|>", "<|pad|>", *(f"<|img_row_{r}_col_{c}|>" for r in range(1, 5) for c in range(1, 5))),
        "<|im_end|>", _chatml("<image>"), _lfm2_vl,
        lambda size: {"tile_size": 64 if size == "tiny" else 512, "min_image_tokens": 4 if size == "tiny" else 64,
                      "max_image_tokens": 16 if size == "tiny" else 256, "max_tiles": 4, "min_tiles": 2,
                      "encoder_patch_size": 16, "downsample_factor": 2},
        bos="<|startoftext|>",
    ),
}
# fmt: on
"""The families :func:`~stream_rt.mllm.tiny_models.build_tiny_model` knows, by ``config.model_type``."""

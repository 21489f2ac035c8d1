"""The models the call-path tests run on, and transformers' own forward of each, to compare
stream_rt's layer loop with.

``qwen2_vl``, ``idefics3`` and ``llava`` are the fitted smoke models; ``qwen3_vl`` and
``gemma3`` the tiny random-weight models of :mod:`stream_rt.mllm.tiny_models`;
``qwen3_vl_moe`` is the tiny Qwen3-VL with a sparse mixture-of-experts MLP, written here
(the tiny recipes stop at the families the daemon's tests run). Random weights say random
things: the tests compare with transformers' own forward, never with a fixed answer."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stream_rt.mllm.smoke import build_smoke_model, cache_root
from stream_rt.mllm.tiny_models import MARKER, VERSION, build_tiny_model, write_once

SMOKE_FAMILIES = ("qwen2_vl", "idefics3", "llava")


def model_dir(family: str) -> Path:
    """The directory of the test model of ``family`` (built on first use, then cached)."""
    if family in SMOKE_FAMILIES:
        return build_smoke_model(family=family)  # type: ignore[arg-type]
    if family == "qwen3_vl_moe":
        return tiny_qwen3_vl_moe()
    return build_tiny_model(family)


def tiny_qwen3_vl_moe() -> Path:
    """The tiny Qwen3-VL's tokenizer, processor and shapes, with four experts (two per
    token) in the MLP of every layer but the second, and seeded random weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    base = build_tiny_model("qwen3_vl")
    target = cache_root() / "tiny" / f"qwen3_vl_moe-tiny-seed0-v{VERSION}"
    marker = {"model_type": "qwen3_vl_moe", "base": str(base), "version": VERSION}
    settings = json.loads((base / "config.json").read_text())
    for key in ("model_type", "architectures", "transformers_version", "dtype"):
        settings.pop(key, None)
    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [1]}
    settings["text_config"] |= {"model_type": "qwen3_vl_moe_text", "decoder_sparse_step": 1, **moe}
    settings["vision_config"]["model_type"] = "qwen3_vl_moe"

    def write(staging: Path) -> None:
        shutil.copytree(base, staging, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.safetensors", "config.json", MARKER))  # fmt: skip
        state = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            model = AutoModelForImageTextToText.from_config(AutoConfig.for_model("qwen3_vl_moe", **settings)).eval()
        finally:
            torch.random.set_rng_state(state)
        model.save_pretrained(str(staging))

    return write_once(target, MARKER, marker, write)


def own_forward(
    model: Any,
    embeds: torch.Tensor,
    positions: torch.Tensor | None,
    cache: Any,
    image_mask: torch.Tensor | None = None,
    deepstack: Sequence[torch.Tensor] = (),
    **kwargs: Any,
) -> Any:
    """transformers' own forward of the language model over ``embeds`` (1, L, hidden),
    continuing ``cache``: the decoder, told what the vision-language model tells it — for
    Qwen3-VL the DeepStack features of the visual positions (``image_mask`` over these L),
    for Gemma 3 which positions are image tokens (its ``token_type_ids``, whose tokens of
    one image attend to each other). Returns the decoder's output."""
    import inspect

    kw = "cache" if "cache" in inspect.signature(model.get_decoder().forward).parameters else "past_key_values"
    kwargs |= {"inputs_embeds": embeds, "position_ids": positions, "use_cache": True, kw: cache}
    if model.config.model_type == "gemma3":
        if image_mask is not None:
            kwargs["token_type_ids"] = image_mask.to(embeds.device).long()[None]
        return model.model(**kwargs)  # the vision-language model's forward makes the token-type mask
    if deepstack:
        assert image_mask is not None
        kwargs |= {"visual_pos_masks": image_mask.to(embeds.device)[None], "deepstack_visual_embeds": list(deepstack)}
    return model.get_decoder()(**kwargs)


def own_logits(model: Any, out: Any) -> torch.Tensor:
    """The last position's logits from a decoder output of :func:`own_forward`."""
    return model.lm_head(out.last_hidden_state[:, -1]).float()

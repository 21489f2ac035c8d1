"""The smoke model: a real model of a supported family, built offline from a config with
seeded random weights and a locally built byte-level tokenizer, so the whole MLLM path
(preprocessing, vision encoder, prefill, decode, answer contract) runs with no download.

Its answers are NOT meaningful. Every answer it gives is labelled ``smoke`` (see
:class:`~stream_rt.graph.packets.MllmAnswer`) and the CLI says so when it loads it.

Three sizes:

- ``tiny`` (well under 1M parameters): for tests and offline demos. After the random
  initialisation it is fitted for a few seconds to always answer with one fixed, valid
  answer-contract JSON object followed by a rambling sentence, so the contract stop and
  answer validation are exercised for real (a random model would never close a brace).
- ``realistic`` (~250M parameters, shaped like SmolVLM-256M, or a Qwen2-VL-shaped model of
  similar size): random weights, for latency benchmarks only.
- ``2b`` (Qwen2-VL only, ~2.2B parameters, shaped like Qwen2-VL-2B: a 32-layer 1280-wide
  vision encoder, a 28-layer 1536-wide language model, its 151,936-token vocabulary): random
  weights in bfloat16, for the GPU benchmark (``benchmarks/gpu.sh``); ~4.4 GB on disk.

A built model is a normal Hugging Face model directory (config, safetensors, tokenizer,
preprocessor config, chat template) plus ``stream_rt_smoke.json``; it is cached under
``$XDG_CACHE_HOME/stream_rt/smoke`` (or ``~/.cache/...``) and rebuilt only when missing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch

from stream_rt.mllm.tiny_models import byte_tokenizer, write_once, write_processing
from stream_rt.mllm.tiny_recipes import RECIPES

log = logging.getLogger("stream_rt.mllm")

SMOKE_MARKER = "stream_rt_smoke.json"
SMOKE_VERSION = 6
Family = Literal["qwen2_vl", "idefics3", "llava"]
Size = Literal["tiny", "realistic", "2b"]

SMOKE_ANSWER = '{"summary": "smoke test", "condition_met": false, "action": "none", "confidence": 0.0}'
SMOKE_RAMBLE = " I hope this helps! Let me know if you need anything else about the scene."
"""What the fitted tiny model says: a valid answer, then text a contract stop saves."""


def cache_root() -> Path:
    """Where built models are kept: ``$XDG_CACHE_HOME/stream_rt`` (or ``~/.cache/stream_rt``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stream_rt"


def default_smoke_dir(family: Family = "qwen2_vl", size: Size = "tiny", seed: int = 0) -> Path:
    return cache_root() / "smoke" / f"{family}-{size}-seed{seed}-v{SMOKE_VERSION}"


def is_smoke_model(path: str | Path) -> bool:
    """Whether ``path`` holds a model stream_rt built with random weights (the smoke model,
    or a tiny model of :mod:`stream_rt.mllm.tiny_models`): its answers are not meaningful."""
    from stream_rt.mllm.tiny_models import MARKER

    return (Path(path) / SMOKE_MARKER).is_file() or (Path(path) / MARKER).is_file()


def build_smoke_model(
    path: str | Path | None = None, family: Family = "qwen2_vl", size: Size = "tiny", seed: int = 0
) -> Path:
    """Build (or find, if already built) the smoke model and return its directory."""
    target = Path(path) if path is not None else default_smoke_dir(family, size, seed)
    marker = {"family": family, "size": size, "seed": seed, "version": SMOKE_VERSION}
    return write_once(target, SMOKE_MARKER, marker, lambda where: _write(family, size, seed, where))


def _write(family: Family, size: Size, seed: int, where: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    recipe = RECIPES[family]
    tokenizer = byte_tokenizer(recipe)
    config = _config(family, size, tokenizer)
    write_processing(recipe, family, "tiny" if size == "tiny" else "realistic", tokenizer, where)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    if size == "2b":  # ~4.4 GB written instead of ~9 GB
        torch.set_default_dtype(torch.bfloat16)
    try:
        model = _model_class(family)(config).eval()
        if size == "tiny":
            _fit_answer(model, tokenizer, where, seed)
    finally:
        torch.random.set_rng_state(generator_state)
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(str(where))


def _config(family: Family, size: Size, tokenizer: Any) -> Any:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*tokenizer.all_special_tokens, *RECIPES[family].others)}
    tiny = size == "tiny"
    if size == "2b" and family != "qwen2_vl":
        raise ValueError("the 2b smoke size is Qwen2-VL-2B shaped: family must be qwen2_vl")
    vocab = 512 if tiny else 151936 if size == "2b" else 49280
    text: dict[str, Any] = (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2}
        if tiny
        else {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
              "num_key_value_heads": 2}
        if size == "2b"
        else {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3}
    )  # fmt: skip
    text |= {"vocab_size": vocab, "max_position_embeddings": 8192, "tie_word_embeddings": True, "bos_token_id": None}
    eos = ids[RECIPES[family].eos]
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = (
            {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2}
            if tiny
            else {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16}
            if size == "2b"
            else {"depth": 12, "embed_dim": 768, "hidden_size": 576, "num_heads": 12}
        )
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        half = head_dim // 2  # M-RoPE splits the rotary half into time, height, width (1:1.5:1.5)
        section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
        return Qwen2VLConfig(
            text_config=text | {"eos_token_id": eos, "rope_parameters": rope},
            vision_config=vision | {"mlp_ratio": 4, "patch_size": 14, "spatial_merge_size": 2,
                                    "temporal_patch_size": 2},
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=True, **{"eos_token_id": eos},
        )  # fmt: skip
    if family == "idefics3":
        from transformers import Idefics3Config

        vision = (
            {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": 64, "patch_size": 16}
            if tiny
            else {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "image_size": 512, "patch_size": 16}
        )  # fmt: skip
        return Idefics3Config(
            text_config={"model_type": "llama", **text, "eos_token_id": eos}, vision_config=vision,
            scale_factor=2 if tiny else 4, image_token_id=ids["<image>"], tie_word_embeddings=True,
            **{"eos_token_id": eos},
        )  # fmt: skip
    from transformers import LlavaConfig

    vision = (
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "image_size": 64, "patch_size": 16, "projection_dim": 32}
        if tiny
        else {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
              "image_size": 336, "patch_size": 14, "projection_dim": 512}
    )  # fmt: skip
    return LlavaConfig(
        text_config={"model_type": "llama", **text, "eos_token_id": eos},
        vision_config={"model_type": "clip_vision_model", **vision},
        image_token_index=ids["<image>"], vision_feature_layer=-1, tie_word_embeddings=True, **{"eos_token_id": eos},
    )  # fmt: skip


def _model_class(family: Family) -> Any:
    import transformers

    return {
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "idefics3": transformers.Idefics3ForConditionalGeneration,
        "llava": transformers.LlavaForConditionalGeneration,
    }[family]


def _fit_answer(model: Any, tokenizer: Any, workdir: Path, seed: int) -> None:
    """Teach the tiny model to answer every request with SMOKE_ANSWER + SMOKE_RAMBLE + EOS
    (a few seconds of Adam on 64 varied prompts), so its output exercises the contract.
    ``workdir`` already holds the tokenizer, image processor and chat template."""
    import numpy as np

    from stream_rt.graph.packets import Event, MllmRequest
    from stream_rt.mllm.models.adapters import family_for
    from stream_rt.mllm.prompt import DEFAULT_QUESTION, chat_messages, context_line, request_text

    adapter = family_for(model.config.model_type)(workdir, model.config)
    rng = np.random.default_rng(seed)
    target = tokenizer(SMOKE_ANSWER + SMOKE_RAMBLE, add_special_tokens=False)["input_ids"]
    target = torch.tensor([*target, tokenizer.eos_token_id])
    words = ["what", "who", "is", "there", "a", "person", "door", "car", "gate", "moving", "open", "the", "scene",
             "happening", "any", "here", "now"]  # fmt: skip
    samples = []
    for _ in range(64):  # varied prompts, sizes and contexts, as real requests are
        height, width = (int(x) for x in rng.integers(48, 640, 2))
        images = tuple(rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(rng.integers(1, 3)))
        question = str(rng.choice([
            " ".join(rng.choice(words, rng.integers(2, 12))) + "?",
            DEFAULT_QUESTION,
            str(rng.choice(["What is happening?", "Describe the scene.", "Is anyone there?"])),
            "".join(chr(c) for c in rng.integers(32, 127, rng.integers(5, 120))),  # any text at all
        ]))  # fmt: skip
        start, now = sorted(float(t) for t in rng.uniform(0, 5000, 2))
        components = {str(k): float(rng.random()) for k in rng.choice(words, rng.integers(0, 3))}
        kind = str(rng.choice(["new", "update", "ask"]))
        event = Event(str(rng.choice(words)), 0, int(now * 1e9), 0, kind, "e", int(start * 1e9), None,  # type: ignore[arg-type]
                      float(rng.random()), 1.0, components, (), True)  # fmt: skip
        context = context_line(event) if rng.random() < 0.8 else ""
        request = MllmRequest("cam", 0, 0, 0, "cam-1", question, images, context)
        text = request_text(request) if rng.random() < 0.6 else question  # also bare questions
        samples.append(adapter.prepare(list(images), chat_messages(len(images), text), model))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses: list[float] = []
    for step in range(3000):
        prepared = samples[step % len(samples)]
        ids = torch.cat([prepared.input_ids[0], target])[None]
        labels = ids.clone()
        labels[0, : prepared.length] = -100
        inputs: dict[str, Any] = {"input_ids": ids, "labels": labels, **prepared.vision}
        if model.config.model_type == "qwen2_vl":
            inputs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
        loss = model(**inputs).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses = [*losses[-len(samples) + 1 :], loss.item()]
        if len(losses) == len(samples) and max(losses) < 0.002:
            break
    model.eval()
    log.debug("smoke model fitted in %d steps (worst recent loss %.4f)", step + 1, max(losses))

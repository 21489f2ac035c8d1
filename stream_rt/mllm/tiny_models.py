"""Small random-weight models of the vision-language families people run, built offline.

:func:`build_tiny_model` writes a normal Hugging Face model directory for a model type —
``config.json`` shaped like the family's real checkpoints but small, seeded random
weights, a byte-level tokenizer with the family's special tokens, the image processor's
settings, the processor's settings and a chat template in the family's layout — so the
whole path (processor, vision encoder, language model, decoding) runs with no download.
Its answers are NOT meaningful. ``size="tiny"`` is for tests (well under 1M parameters);
``"realistic"`` is shaped like the family's small checkpoints (a few hundred million
parameters), for latency benchmarks.

Each family's recipe says only what differs: its special tokens, its chat template, the
config fields naming the image tokens, and how small its image processor's images are.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stream_rt.mllm.tiny_recipes import RECIPES, Recipe, Size

log = logging.getLogger("stream_rt.mllm")

MARKER = "stream_rt_tiny.json"
VERSION = 4  # 2: the tiny Qwen3-VL feeds three DeepStack layers, the tiny Gemma 3 scales queries by 1/sqrt(32);
# 3: realistic sizes shaped like Qwen3-VL-2B and Gemma 3 270M, with the families' own vocabularies


def default_tiny_dir(model_type: str, size: Size = "tiny", seed: int = 0) -> Path:
    from stream_rt.mllm.smoke import cache_root

    return cache_root() / "tiny" / f"{model_type}-{size}-seed{seed}-v{VERSION}"


def build_tiny_model(model_type: str, path: str | Path | None = None, *, size: Size = "tiny", seed: int = 0) -> Path:
    """Write (or find, if already written) a random-weight model of ``model_type`` in
    ``path`` (default: under the stream_rt cache) and return its directory."""
    recipe = RECIPES.get(model_type)
    if recipe is None:
        raise ValueError(f"no tiny recipe for model type '{model_type}' (known: {', '.join(sorted(RECIPES))})")
    target = Path(path) if path is not None else default_tiny_dir(model_type, size, seed)
    marker = {"model_type": model_type, "size": size, "seed": seed, "version": VERSION}
    return write_once(target, MARKER, marker, lambda where: _write(recipe, model_type, size, seed, where))


def write_once(target: Path, marker_file: str, marker: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """``target`` as ``write`` makes it: written into a staging directory beside it, then
    moved into place with ``marker`` (so an interrupted build leaves nothing half-made).
    A directory whose marker already says ``marker`` is kept as it is; one built with other
    settings is replaced; anything else already there is refused (never deleted)."""
    target = target.expanduser()
    done = target / marker_file
    if done.is_file() and json.loads(done.read_text()) == marker:
        return target
    if target.exists() and not done.is_file() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{target} already exists and is not a model stream_rt built: give a new or empty directory")
    log.info("building %s (random weights, not meaningful) in %s", marker, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        write(staging)
        (staging / marker_file).write_text(json.dumps(marker), encoding="utf-8")
        staging.chmod(0o755)  # (mkdtemp makes it private)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_processing(recipe: Recipe, model_type: str, size: Size, tokenizer: Any, where: Path) -> None:
    """The files a model's processor is assembled from: tokenizer, image processor
    settings, processor settings and chat template."""
    tokenizer.save_pretrained(str(where))
    save_image_processor(model_type, recipe.image_processor(size), where)
    if recipe.feature_extractor is not None:
        save_feature_extractor(recipe.feature_extractor(size), where)
    processor = {"processor_class": _processor_class(model_type), **recipe.processor(size)}
    (where / "processor_config.json").write_text(json.dumps(processor, indent=2), encoding="utf-8")
    (where / "chat_template.jinja").write_text(recipe.template, encoding="utf-8")


def _write(recipe: Recipe, model_type: str, size: Size, seed: int, where: Path) -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = byte_tokenizer(recipe)
    write_processing(recipe, model_type, size, tokenizer, where)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
    ids |= {token: tokenizer.convert_tokens_to_ids(token) for token in recipe.others}
    ids = dict(sorted(ids.items(), key=lambda kv: kv[1]))
    settings = recipe.config(ids, size)
    # realistic: the family's own vocabulary size (its output layer is a large part of decoding)
    reference = AutoConfig.for_model(model_type).get_text_config().vocab_size
    settings["text_config"]["vocab_size"] = len(tokenizer) if size == "tiny" else max(len(tokenizer), reference)
    eos = tokenizer.convert_tokens_to_ids(recipe.eos)
    settings["text_config"] |= {"eos_token_id": eos, "bos_token_id": tokenizer.bos_token_id,
                                "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    config = AutoConfig.for_model(model_type, **settings, eos_token_id=eos, tie_word_embeddings=True)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForImageTextToText.from_config(config).eval()
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.save_pretrained(str(where))


def byte_tokenizer(recipe: Recipe) -> Any:
    """A byte-level BPE without merges (every byte a token, so any text encodes) with the
    recipe's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    named = {"eos_token": recipe.eos} | ({"bos_token": recipe.bos} if recipe.bos else {})
    tokens = [*named.values(), *recipe.specials.values(), *recipe.others]
    tok.add_special_tokens(list(dict.fromkeys(tokens)))
    pad = next((t for t in recipe.others if "pad" in t or "endoftext" in t), recipe.eos)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, extra_special_tokens=dict(recipe.specials),
                                   **named)  # fmt: skip


def _processor_class(model_type: str) -> str:
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES  # type: ignore[attr-defined]

    from stream_rt.mllm.models.processors import processing_type

    return str(PROCESSOR_MAPPING_NAMES[processing_type(model_type)])


def save_image_processor(model_type: str, settings: dict[str, Any], where: Path) -> None:
    """Write the family's image processor with ``settings`` (``preprocessor_config.json``),
    named as real checkpoints name it (the class name without its backend's suffix)."""
    from stream_rt.mllm.models.processors import image_processor_class

    image_processor_class(model_type)(**settings).save_pretrained(str(where))
    saved = where / "preprocessor_config.json"
    data = json.loads(saved.read_text(encoding="utf-8"))
    data["image_processor_type"] = str(data.get("image_processor_type", "")).removesuffix("Pil")
    saved.write_text(json.dumps(data, indent=2), encoding="utf-8")


def save_feature_extractor(settings: dict[str, Any], where: Path) -> None:
    """Add Whisper's audio feature extractor with ``settings`` to ``preprocessor_config.json``
    (one file for both, as Qwen2.5-Omni's checkpoints have it)."""
    from transformers import WhisperFeatureExtractor

    saved = where / "preprocessor_config.json"
    data = json.loads(saved.read_text(encoding="utf-8"))
    data |= WhisperFeatureExtractor(**settings).to_dict()
    saved.write_text(json.dumps(data, indent=2), encoding="utf-8")

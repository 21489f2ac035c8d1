"""Finding and checking a local Hugging Face model before any weight is read: where its
directory is (:func:`resolve_model`), whether transformers can load it here with the
configured techniques (:func:`inspect_model`), whether its weights are whole
(:func:`check_weights`) and its device exists (:func:`check_device`). Each failure is one
line: :class:`~stream_rt.mllm.backend.MissingWeights` or
:class:`~stream_rt.mllm.backend.ModelUnavailable`."""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stream_rt.mllm.backend import MissingWeights, ModelUnavailable, first_line
from stream_rt.mllm.models.adapters import ADAPTERS, family_for
from stream_rt.mllm.models.families import Family, image_token_id
from stream_rt.mllm.smoke import build_smoke_model


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # on its device, in eval mode
    family: Family
    cache_kw: str  # the decoder's cache argument: transformers renamed past_key_values to cache in 5.x
    model_type: str


def load_model(path: Path, ref: str, techniques: list[str], device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The model in ``path`` (``ref`` names it in errors) and the family that runs it, once
    :func:`inspect_model` passed. Raises :class:`ModelUnavailable` where transformers cannot
    load its weights (damaged ones too)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForImageTextToText

    config, family, processor = inspect_model(path, techniques)
    try:
        with quiet_transformers():
            model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
            model = model.to(device).eval()  # type: ignore[arg-type]
        runner = family(path, config, processor)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError, SafetensorError) as exc:  # damaged too
        raise ModelUnavailable(f"cannot load model '{ref}': {first_line(exc)}") from None
    cache_kw = "past_key_values"
    if family.adapter:
        parameters = inspect.signature(model.get_decoder().forward).parameters
        cache_kw = "cache" if "cache" in parameters else "past_key_values"
    return LoadedModel(model, runner, cache_kw, str(config.model_type))


def resolve_model(ref: str, allow_download: bool = False) -> tuple[Path, str]:
    """(the model's directory, its name) for ``ref``: ``"smoke"``, a local directory, or a
    hub id (from the local cache only, unless ``allow_download``). Raises
    :class:`MissingWeights` saying how to provide it."""
    if ref == "smoke":
        return build_smoke_model(), "smoke"
    local = Path(ref).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise MissingWeights(f"'{local}' is not a model directory (no config.json)")
        return local, ref
    if local.suffix or ref.startswith((".", "/", "~")):
        raise MissingWeights(f"model directory '{ref}' does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref, local_files_only=not allow_download)), ref
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        if allow_download:
            raise MissingWeights(f"cannot download model '{ref}': {first_line(exc)}") from None
        raise MissingWeights(
            f"cannot load model '{ref}': it is not in the local Hugging Face cache and downloads are off; run "
            f"`{download_command()} {ref}` where there is network (or copy the model directory here and give its "
            'path), or use the smoke model (model = "smoke", --model smoke)'
        ) from None


def describe_model(ref: str, allow_download: bool, techniques: list[str]) -> str:
    """A line saying what will run ``ref`` with ``techniques``, checked without reading any
    weight (:func:`inspect_model`); raises :class:`ModelUnavailable` or
    :class:`MissingWeights` where it cannot run."""
    if ref == "smoke":
        return "smoke (random weights, built on first use)"
    try:
        path, name = resolve_model(ref, allow_download=False)
    except MissingWeights:
        if not allow_download:
            raise
        return f"{ref} (not in the local cache: downloaded at start)"
    config, family, _ = inspect_model(path, techniques)
    how = f"{family.name} adapter" if family.adapter else "generic path"
    return f"{name} ({config.model_type}, {how})"


def download_command() -> str:
    """The command the installed huggingface_hub provides to download a model."""
    import importlib.metadata

    scripts = {e.name for e in importlib.metadata.entry_points(group="console_scripts")}
    return "hf download" if "hf" in scripts or "huggingface-cli" not in scripts else "huggingface-cli download"


WHOLE_OMNI_MODELS = {
    "qwen2_5_omni": "Qwen2_5OmniForConditionalGeneration",
    "qwen3_omni_moe": "Qwen3OmniMoeForConditionalGeneration",
}
"""Omni checkpoints as published (thinker and talker), and transformers' class for them."""


def _declared_model_type(path: Path) -> str | None:
    """The ``model_type`` a model folder's ``config.json`` declares, read as plain JSON."""
    try:
        declared = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return declared if isinstance(declared, str) else None


def inspect_model(path: Path, techniques: list[str] | None = None) -> tuple[Any, type[Family], Any]:
    """(the model's config, the family that runs it, its processor), checked before any
    weight is read: its weight files are whole, transformers knows the model type and
    loads it as an image-text-to-text model, its processor (with a tokenizer that knows
    the image token) can be assembled here, and every technique in ``techniques`` (names,
    as :attr:`TransformersBackend.techniques` gives them) has a family adapter to run in.
    Raises :class:`ModelUnavailable` saying which of these fails."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from stream_rt.mllm.models.processors import ProcessorUnavailable, load_processor

    whole_omni = _declared_model_type(path)
    if whole_omni in WHOLE_OMNI_MODELS:  # said before transformers reads (and warns about) its talker's settings
        raise ModelUnavailable(
            f"{path} is a whole '{whole_omni}' model (its thinker and its speech talker); stream_rt runs the thinker: "
            f"save it once with {WHOLE_OMNI_MODELS[whole_omni]}.from_pretrained(PATH).thinker.save_pretrained(DIR), "
            "the processor beside it, and give DIR"
        )
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelUnavailable(
            f"transformers {transformers.__version__} cannot read the config of {path}: {first_line(exc)}"
        ) from None
    model_type = str(config.model_type)
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ModelUnavailable(
            f"{path} is a '{model_type}' model, which transformers {transformers.__version__} does not load as an "
            "image-text-to-text (vision-language) model"
        )
    family = family_for(model_type)
    if (reason := family.refusal(config)) is not None:
        raise ModelUnavailable(f"{path}: {reason}")
    refused = [t for t in techniques or [] if not family.adapter]
    if refused:
        adapters = ", ".join(t for f in ADAPTERS for t in f.model_types)
        raise ModelUnavailable(
            f"model type '{model_type}' runs on the generic path (adapters: {adapters}), which has no "
            f"{' and no '.join(refused)}: set {' and '.join(TECHNIQUE_KEYS[t] for t in refused)}"
        )
    check_weights(path)
    try:
        processor = load_processor(path, model_type)
    except ProcessorUnavailable as exc:
        raise ModelUnavailable(str(exc)) from None
    image_token = image_token_id(config, processor)
    if image_token >= len(processor.tokenizer):  # (transformers builds an empty tokenizer where its files are missing)
        raise ModelUnavailable(
            f"the tokenizer of {path} has {len(processor.tokenizer)} tokens and not the model's image token "
            f"({image_token}): are its tokenizer files missing?"
        )
    return config, family, processor


TECHNIQUE_KEYS = {
    "token reuse": "[mllm.token_reuse] enabled = false",
    "clip compression": '[mllm.clip] compression = "off"',
    "layer exit": "[mllm] layer_exit_every = 0",
}
"""The setting that turns each technique off (for the line that refuses it)."""


def check_weights(path: Path) -> None:
    """Raise :class:`ModelUnavailable` if ``path`` holds no weights, or a safetensors file
    whose header does not describe the file (a damaged or cut-short download); reading
    the headers costs next to nothing."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files and not any(path.glob("*.bin")):
        raise ModelUnavailable(f"{path} holds no weights (*.safetensors or *.bin)")
    for file in files:
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelUnavailable(f"damaged weights in {file}: {first_line(exc)}") from None


def check_device(name: str) -> torch.device:
    """The torch device ``name`` names, if this machine has it; else :class:`ModelUnavailable`."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ModelUnavailable(f"device '{name}': {first_line(exc)}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        why = f"torch {torch.__version__} was built without CUDA" if torch.version.cuda is None else "no such GPU here"
        raise ModelUnavailable(f"device '{name}' is not available ({why}): use device = \"cpu\"")
    return device


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@contextlib.contextmanager
def quiet_transformers() -> Any:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)

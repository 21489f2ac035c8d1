"""A model's processor — tokenizer, image processor, chat template — assembled so that it
works with torchvision absent (as on many robots, and on CPU machines whose package index
serves only CUDA builds of it) and present.

transformers' ``AutoProcessor`` also loads the model's video processor, and every video
processor needs torchvision, so it fails without it; many processor classes cannot even
be constructed without one. :func:`load_processor` builds the model's own processor class
with its own tokenizer, its image processor (the PIL implementation where torchvision is
missing, the default one where it is there), its ``processor_config.json`` settings and
its chat template, and no video processor: clips go to the model as several images. A
model that takes audio (Qwen2.5-Omni's, Qwen3-Omni's thinker) also gets its audio feature extractor
(Whisper's, NumPy only), for the clip's sound.

Where transformers has only a torchvision image processor for a family, stream_rt has a
PIL port of its own (LFM2-VL: :class:`Lfm2VlImageProcessorPil`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs
from transformers.utils.constants import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
from transformers.utils.import_utils import is_torchvision_available

from stream_rt.mllm.backend import first_line


class ProcessorUnavailable(RuntimeError):
    """The model's processor cannot be assembled here; ``str()`` says why in one line."""


def load_processor(path: str | Path, model_type: str) -> ProcessorMixin:
    """The processor of the model in ``path`` (its ``config.model_type`` is ``model_type``):
    its own class, built from its tokenizer, image processor, ``processor_config.json``
    settings and chat template — not through ``from_pretrained``, which loads every
    sub-processor the class names (a video processor needs torchvision)."""
    cls = processor_class(model_type)
    image_processor = load_image_processor(path, model_type)
    attributes = cls.get_attributes()
    feature_extractor = load_feature_extractor(path) if "feature_extractor" in attributes else None
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise ProcessorUnavailable(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ProcessorUnavailable(f"cannot load the tokenizer of {path}: {first_line(exc)}") from None
    template = chat_template(Path(path)) or getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        raise ProcessorUnavailable(f"{path} has no chat template (chat_template.jinja or the tokenizer's)")

    class WithoutVideo(cls):  # type: ignore[valid-type,misc]
        """The model's processor class, given only its tokenizer and image processor."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument is None:  # the video processor, an audio feature extractor where none is named: not used
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    WithoutVideo.__name__ = WithoutVideo.__qualname__ = cls.__name__
    parts = {"tokenizer": tokenizer, "image_processor": image_processor, "feature_extractor": feature_extractor}
    named = {n for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD}
    settings = {k: v for k, v in _processor_settings(Path(path)).items() if k in named and k not in attributes}
    try:
        processor = WithoutVideo(**{a: parts.get(a) for a in attributes}, chat_template=template, **settings)
    except (ValueError, TypeError, KeyError, AttributeError, ImportError) as exc:
        raise ProcessorUnavailable(f"cannot assemble the {cls.__name__} of {path}: {first_line(exc)}") from None
    for attribute in attributes:  # absent rather than None: processors test with hasattr
        if getattr(processor, attribute, None) is None and attribute in vars(processor):
            delattr(processor, attribute)
    return processor


def load_feature_extractor(path: str | Path) -> Any:
    """The audio feature extractor ``path``'s ``preprocessor_config.json`` names (one file
    holds it beside the image processor's settings, as Qwen2.5-Omni's checkpoints do), or
    ``None`` where it names none."""
    from transformers import AutoFeatureExtractor

    settings = Path(path) / "preprocessor_config.json"
    try:
        named = json.loads(settings.read_text(encoding="utf-8")).get("feature_extractor_type")
    except (OSError, ValueError, AttributeError):
        named = None
    if not named:
        return None
    try:
        return AutoFeatureExtractor.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ProcessorUnavailable(f"cannot load the audio feature extractor of {path}: {first_line(exc)}") from None


PROCESSOR_MODEL_TYPES = {"qwen2_5_omni_thinker": "qwen2_5_omni", "qwen3_omni_moe_thinker": "qwen3_omni_moe"}
"""Model types whose processor transformers files under another model type (an omni
model's thinker: the processor is the whole model's)."""


def processing_type(model_type: str) -> str:
    """The model type transformers files ``model_type``'s processors under."""
    return PROCESSOR_MODEL_TYPES.get(model_type, model_type)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""A model directory's tokenizer is in one of these (transformers builds an empty one where none is)."""


def chat_template(path: Path) -> str | None:
    """The model directory's own chat template: ``chat_template.jinja`` or ``chat_template.json``."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    js = path / "chat_template.json"
    if js.is_file():
        template = json.loads(js.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def _processor_settings(path: Path) -> dict[str, Any]:
    """The processor's own settings (``processor_config.json``), if the directory has them."""
    settings = path / "processor_config.json"
    if not settings.is_file():
        return {}
    try:
        data = json.loads(settings.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProcessorUnavailable(f"cannot read {settings}: {first_line(exc)}") from None
    return data if isinstance(data, dict) else {}


def processor_class(model_type: str) -> type[ProcessorMixin]:
    """The processor class transformers names for ``model_type``, imported even where
    transformers' lazy import would hand out a placeholder because torchvision is missing."""
    from transformers.models.auto.processing_auto import (  # type: ignore[attr-defined]
        PROCESSOR_MAPPING_NAMES,
        processor_class_from_name,
    )

    name = PROCESSOR_MAPPING_NAMES.get(processing_type(model_type))
    cls = processor_class_from_name(name) if name else None
    if cls is None:
        raise ProcessorUnavailable(f"transformers has no processor class for model type '{model_type}'")
    if getattr(cls, "is_dummy", False):
        cls = _import_without_torchvision(str(name))
    return cls


def _import_without_torchvision(class_name: str) -> type[ProcessorMixin]:
    """Import processor class ``class_name`` from its own module. Some processor modules
    import a size helper from their family's torchvision image processor module; where
    torchvision is missing, that module's PIL twin (which transformers keeps defining the
    same helpers) stands in for it."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES  # type: ignore[attr-defined]

    for model_type, name in PROCESSOR_MAPPING_NAMES.items():
        if name != class_name:
            continue
        package = f"transformers.models.{model_type_to_module_name(model_type)}"
        submodule = getattr(importlib.import_module(package), "_class_to_module", {}).get(class_name)
        if submodule is None:
            continue
        folder = Path(importlib.import_module(package).__file__ or "").parent
        for twin in folder.glob("image_processing_pil_*.py"):
            torchvision_module = f"{package}.{twin.stem.replace('image_processing_pil_', 'image_processing_')}"
            if torchvision_module not in sys.modules:
                sys.modules[torchvision_module] = importlib.import_module(f"{package}.{twin.stem}")
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), class_name)
        except ImportError as exc:
            raise ProcessorUnavailable(
                f"{class_name} cannot be imported without torchvision: {first_line(exc)}"
            ) from None
    raise ProcessorUnavailable(f"transformers does not say where {class_name} is defined")


def load_image_processor(path: str | Path, model_type: str) -> Any:
    """The image processor in ``path``: the default implementation with torchvision, the
    PIL one without (stream_rt's own where transformers has none)."""
    torchvision = is_torchvision_available()
    if not torchvision and model_type in OWN_PIL_PROCESSORS:
        return OWN_PIL_PROCESSORS[model_type].from_pretrained(str(path))
    try:
        return AutoImageProcessor.from_pretrained(str(path), backend=None if torchvision else "pil")
    except (OSError, ValueError, ImportError, KeyError) as exc:
        if not torchvision and not _has_pil(Path(path), model_type):
            raise ProcessorUnavailable(
                f"the image processor of model type '{model_type}' needs torchvision, which is not installed"
            ) from None
        raise ProcessorUnavailable(f"cannot load the image processor of {path}: {first_line(exc)}") from None


def _has_pil(path: Path, model_type: str) -> bool:
    """Whether transformers has a PIL implementation of the image processor ``path``'s
    settings name (``image_processor_type``), or of its model type's."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES  # type: ignore[attr-defined]

    settings = path / "preprocessor_config.json"
    try:
        declared = json.loads(settings.read_text(encoding="utf-8")).get("image_processor_type") or ""
    except (OSError, ValueError, AttributeError):
        declared = ""
    base = str(declared).removesuffix("Fast").removesuffix("Pil")
    for names in IMAGE_PROCESSOR_MAPPING_NAMES.values():
        if names and names.get("pil") and base and base in (names.get("torchvision"), names["pil"].removesuffix("Pil")):
            return True
    return _class_name(model_type, "pil") is not None


def image_processor_class(model_type: str) -> type:
    """The class :func:`load_image_processor` takes for ``model_type`` here, as the model
    type names it (a checkpoint's own settings may name another)."""
    from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

    if not is_torchvision_available() and model_type in OWN_PIL_PROCESSORS:
        return OWN_PIL_PROCESSORS[model_type]
    name = _class_name(model_type, "torchvision" if is_torchvision_available() else "pil")
    found = get_image_processor_class_from_name(name) if name else None
    if found is None:
        raise ProcessorUnavailable(f"no image processor for model type '{model_type}' here (torchvision missing?)")
    return found


def _class_name(model_type: str, backend: str) -> str | None:
    """The image processor class transformers maps ``model_type`` to for ``backend``
    (``"pil"`` or ``"torchvision"``; a PIL class is used where torchvision's is missing)."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES  # type: ignore[attr-defined]

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(processing_type(model_type)) or {}
    name = names.get(backend) or (names.get("pil") if backend == "torchvision" else None)
    return str(name) if name else None


class Lfm2VlImagesKwargs(ImagesKwargs, total=False):
    downsample_factor: int
    do_image_splitting: bool
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    min_image_tokens: int
    max_image_tokens: int
    encoder_patch_size: int
    tile_size: int
    max_pixels_tolerance: float
    return_row_col_info: bool


class Lfm2VlImageProcessorPil(PilBackend):
    """LFM2-VL's image processing with PIL and NumPy (transformers ships only a
    torchvision implementation): an image small enough for one tile is resized so its
    sides are multiples of ``encoder_patch_size * downsample_factor`` within the token
    budget; a larger one is cut into a grid of ``tile_size`` tiles (between ``min_tiles``
    and ``max_tiles``, the grid closest to its aspect ratio) plus a thumbnail. Each tile
    becomes rows of flattened patches, padded to a common count with a mask.

    Its resizing is PIL's (transformers' is torchvision's antialiased one), so pixel values
    differ slightly from the torchvision implementation's; the layout and token counts
    are the same."""

    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    size = {"height": 512, "width": 512}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_pad = True
    downsample_factor = 2
    do_image_splitting = True
    min_tiles = 2
    max_tiles = 10
    use_thumbnail = True
    min_image_tokens = 64
    max_image_tokens = 256
    encoder_patch_size = 16
    tile_size = 512
    max_pixels_tolerance = 2.0
    return_row_col_info = False
    valid_kwargs = Lfm2VlImagesKwargs
    model_input_names = ["pixel_values", "pixel_attention_mask", "spatial_shapes"]

    def _preprocess(self, images: list[np.ndarray], **kw: Any) -> BatchFeature:  # type: ignore[override]
        factor, patch = int(kw["downsample_factor"]), int(kw["encoder_patch_size"])
        splitting = bool(kw["do_image_splitting"])
        min_tiles, max_tiles = (int(kw["min_tiles"]), int(kw["max_tiles"])) if splitting else (1, 1)
        tile = int(kw["tile_size"])
        budget = (int(kw["min_image_tokens"]), int(kw["max_image_tokens"]))
        max_patches = max(budget[1] * factor**2, (tile // patch) ** 2 if splitting else 0)
        pieces, spatial, masks, rows, cols, sizes = [], [], [], [], [], []
        for image in images:
            height, width = image.shape[-2:]
            new_h, new_w = _smart_size(height, width, patch * factor, budget)
            large = _rounded_pixels(height, width, patch, patch * factor) > budget[1] * (patch * factor) ** 2 * float(
                kw["max_pixels_tolerance"]
            )
            if large and not min_tiles == max_tiles == 1:
                grid_w, grid_h = _grid(width / height, min_tiles, max_tiles, width * height, tile)
                whole = self.resize(image, SizeDict(height=tile * grid_h, width=tile * grid_w), resample=kw["resample"])
                tiles = [whole[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
                         for r in range(grid_h) for c in range(grid_w)]  # fmt: skip
                if kw["use_thumbnail"] and grid_w * grid_h != 1:
                    tiles.append(self.resize(image, SizeDict(height=new_h, width=new_w), resample=kw["resample"]))
                rows.append(grid_h)
                cols.append(grid_w)
            else:
                tiles = [self.resize(image, SizeDict(height=new_h, width=new_w), resample=kw["resample"])]
                rows.append(1)
                cols.append(1)
            sizes.append([new_h, new_w])
            for t in tiles:
                t = self.rescale_and_normalize(
                    t[None], kw["do_rescale"], kw["rescale_factor"], kw["do_normalize"], kw["image_mean"],
                    kw["image_std"],
                )[0]  # fmt: skip
                channels, h, w = t.shape
                flat = t.reshape(channels, h // patch, patch, w // patch, patch).transpose(1, 3, 2, 4, 0)
                flat = flat.reshape((h // patch) * (w // patch), -1)
                mask = np.zeros(max_patches, np.int32)
                mask[: len(flat)] = 1
                pieces.append(np.pad(flat, ((0, max_patches - len(flat)), (0, 0))))
                masks.append(mask)
                spatial.append([h // patch, w // patch])
        data: dict[str, Any] = {"pixel_values": np.stack(pieces).astype(np.float32)}
        if kw["do_pad"]:
            data |= {"pixel_attention_mask": np.stack(masks), "spatial_shapes": np.array(spatial, np.int64)}
        if kw["return_row_col_info"]:
            data |= {"image_rows": rows, "image_cols": cols, "image_sizes": sizes}
        return BatchFeature(data=data, tensor_type=kw.get("return_tensors"))

    def rescale_and_normalize(self, images: np.ndarray, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                              mean: Any, std: Any) -> np.ndarray:  # fmt: skip
        out = images.astype(np.float32)
        if do_rescale:
            out = out * rescale_factor
        if do_normalize:
            out = (out - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
        return out


def _rounded_pixels(height: int, width: int, least: int, factor: int) -> int:
    return max(least, round(height / factor) * factor) * max(least, round(width / factor) * factor)


def _smart_size(height: int, width: int, factor: int, budget: tuple[int, int]) -> tuple[int, int]:
    """(height, width): multiples of ``factor`` near the image's, its area within the token budget."""
    low, high = (tokens * factor**2 for tokens in budget)
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > high:
        beta = math.sqrt(height * width / high)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < low:
        beta = math.sqrt(low / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@cache
def _ratios(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    pairs = {
        (w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if min_tiles <= w * h <= max_tiles
    }
    return sorted(pairs, key=lambda p: p[0] * p[1])


def _grid(aspect: float, min_tiles: int, max_tiles: int, area: int, tile: int) -> tuple[int, int]:
    """(columns, rows) of the tile grid closest to ``aspect``; on a tie, the larger grid if
    the image covers more than half of it."""
    best, best_diff = (1, 1), math.inf
    for w, h in _ratios(min_tiles, max_tiles):
        diff = abs(aspect - w / h)
        if diff < best_diff:
            best, best_diff = (w, h), diff
        elif diff == best_diff and area > 0.5 * tile * tile * w * h:
            best = (w, h)
    return best


OWN_PIL_PROCESSORS: dict[str, type[PilBackend]] = {"lfm2_vl": Lfm2VlImageProcessorPil}
"""Families whose only image processor in transformers needs torchvision."""

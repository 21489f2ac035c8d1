"""Local Hugging Face vision-language models on CPU or CUDA: the family adapters (Qwen2-VL /
Qwen2.5-VL, Qwen3-VL, SmolVLM / Idefics3, LLaVA, Gemma 3) and any other model transformers
loads, on the generic path.

The model runs in the backend's own thread with a greedy decoding loop of its own rather than
``generate()``: the vision encoder, prefill and each decoded token are timed apart, text
streams out as it is decoded, a cancel flag is checked at every token, and decoding stops
the moment the answer contract's JSON object closes (``stop="contract"``).

``model`` is a local directory or a hub id. Hub ids are looked up in the local Hugging
Face cache only, unless ``allow_download``; a model that is not there raises
:class:`~stream_rt.mllm.backend.MissingWeights` with one line saying how to provide it.
``model = "smoke"`` builds and uses the smoke model (:mod:`stream_rt.mllm.smoke`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from stream_rt.graph.packets import AudioFeatures, MllmAnswer, MllmRequest
from stream_rt.mllm.backend import (
    Backend,
    BackendError,
    MissingWeights,
    ModelUnavailable,
    OnText,
    answer_from_text,
    first_line,
)
from stream_rt.mllm.backends.decoding import Generation, Sampling, TokenStream
from stream_rt.mllm.backends.generic import generate_generic
from stream_rt.mllm.models.families import ADAPTERS, Family, Prepared, VisualFeatures, family_for, image_token_id
from stream_rt.mllm.models.layer_loop import KV, run_prefill
from stream_rt.mllm.prompt import Prompt, chat_messages, request_text
from stream_rt.mllm.smoke import build_smoke_model, is_smoke_model
from stream_rt.mllm.techniques.compression import Compression
from stream_rt.mllm.techniques.layer_exit import LayerExit
from stream_rt.mllm.techniques.memory_prefix import (
    MemoryPrefix,
    PrefixState,
    after_prefix,
    memory_fingerprint,
    pooled_tokens,
)
from stream_rt.mllm.techniques.token_reuse import TokenReuse
from stream_rt.sources.av_decode import rgb_luma

if TYPE_CHECKING:
    from stream_rt.memory.streaming import MemoryEntry

log = logging.getLogger("stream_rt.mllm")


class TransformersBackend(Backend):
    def __init__(
        self,
        model: str = "smoke",
        *,
        device: str = "cpu",
        dtype: str = "auto",
        max_new_tokens: int = 96,
        contract_stop: bool = True,
        threads: int | None = None,
        allow_download: bool = False,
        layer_exit: LayerExit | None = None,
        token_reuse: TokenReuse | None = None,
        compression: Compression | None = None,
        memory_text_tokens: int = 32,
    ) -> None:
        self.model_ref = model
        self.device_name = device
        try:  # a device this machine lacks is one line at check() and load()
            self.device = torch.device(device)
        except RuntimeError:
            self.device = torch.device("cpu")
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.contract_stop = contract_stop
        self.threads = threads
        self.allow_download = allow_download
        self.layer_exit = layer_exit
        self.token_reuse = token_reuse
        self.compression = compression
        self.memory_prefix = MemoryPrefix(memory_text_tokens)
        self.name = model
        self.model: Any = None
        self.family: Family | None = None
        self.cache_kw = "past_key_values"
        self._lock = threading.Lock()  # one generation at a time

    async def start(self) -> None:
        if self.model is None:
            await self.in_model_thread(self.load)

    def load(self) -> None:
        """Load the weights (blocking). Raises :class:`ModelUnavailable` (one line) if the
        model is not here, transformers cannot load it, or a configured technique does not
        work with it."""
        from safetensors import SafetensorError
        from transformers import AutoModelForImageTextToText
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if self.threads:
            torch.set_num_threads(self.threads)
        self.device = check_device(self.device_name)
        path, self.name = resolve_model(self.model_ref, self.allow_download)
        self.smoke = is_smoke_model(path)
        config, family, processor = inspect_model(path, self.techniques)
        dtype = _dtype(self.dtype, self.device)
        try:
            with _quiet_transformers():
                model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
                self.model = model.to(self.device).eval()  # type: ignore[arg-type]
            self.family = family(path, config, processor)
        except (OSError, ValueError, RuntimeError, KeyError, ImportError, SafetensorError) as exc:  # damaged too
            self.model = None
            raise ModelUnavailable(f"cannot load model '{self.model_ref}': {first_line(exc)}") from None
        if family.adapter:
            # transformers renamed the decoder's cache argument (past_key_values -> cache) in 5.x.
            parameters = inspect.signature(self.model.get_decoder().forward).parameters
            self.cache_kw = "cache" if "cache" in parameters else "past_key_values"
        how = f"{family.name} adapter" if family.adapter else "generic path"
        log.info("MLLM: %s (%s, %s) on %s, %s", self.name, config.model_type, how, self.device, dtype)
        if self.smoke:  # said once it loaded: a model that cannot load is one line
            log.warning("MLLM: %s has random weights (built by stream_rt): its answers are NOT meaningful", self.name)

    def check(self) -> str:
        """Check, without reading any weight, that the model can be loaded here with the
        configured techniques (:func:`inspect_model`); a line saying what will run it.
        Raises :class:`ModelUnavailable` otherwise."""
        check_device(self.device_name)
        if self.model_ref == "smoke":
            return "smoke (random weights, built on first use)"
        try:
            path, name = resolve_model(self.model_ref, allow_download=False)
        except MissingWeights:
            if not self.allow_download:
                raise
            return f"{self.model_ref} (not in the local cache: downloaded at start)"
        config, family, _ = inspect_model(path, self.techniques)
        how = f"{family.name} adapter" if family.adapter else "generic path"
        return f"{name} ({config.model_type}, {how})"

    @property
    def techniques(self) -> list[str]:
        """The techniques this backend was configured with that need a family adapter."""
        wanted = {"token reuse": self.token_reuse, "clip compression": self.compression,
                  "layer exit": self.layer_exit}  # fmt: skip
        return [name for name, setting in wanted.items() if setting is not None]

    async def answer(self, request: MllmRequest, on_text: OnText | None = None) -> MllmAnswer:
        if self.model is None:
            await self.start()
        cancel = threading.Event()
        loop = asyncio.get_running_loop()

        def stream(piece: str) -> None:
            if on_text is not None:
                loop.call_soon_threadsafe(on_text, piece)

        started = time.perf_counter()
        images, text = list(request.images), request_text(request)
        reuse = ((request.source_id, request.question), request.event_id) if images else None  # nothing to reuse
        clip = (list(request.frame_pts), list(request.audio)) if len(request.frame_pts) == len(images) > 1 else None
        memory = (request.source_id, request.memory) if request.memory else None
        task = asyncio.ensure_future(
            self.in_model_thread(
                self.generate, images, text, cancel, stream, None, reuse, clip, memory, request.summary_tokens
            )
        )
        try:
            gen = await asyncio.shield(task)
        except asyncio.CancelledError:
            cancel.set()  # the thread stops at its next token
            raise
        extra = {"visual_reused": gen.reuse.reused_tokens, "tiles_reused": gen.reuse.tiles_reused} if gen.reuse else {}
        if gen.memory_tokens:
            extra["memory"] = gen.memory_tokens
        if gen.visual_dropped:
            extra["visual_dropped"] = gen.visual_dropped
        return answer_from_text(
            request, gen.text, self, stop=gen.stop, exit_depth=gen.exit_depth, visual_summary=gen.summary,
            timings={**({"encode": gen.encode_s} if gen.encode_s is not None else {}), "prefill": gen.prefill_s,
                     "decode": gen.decode_s, "total": time.perf_counter() - started},
            tokens={"prompt": gen.prompt_tokens, "visual": gen.visual_tokens, "generated": len(gen.token_ids),
                    **extra},
        )  # fmt: skip

    def counters(self) -> dict[str, int]:
        if self.token_reuse is None:
            return {}
        return {f"reuse_evicted_{bound}": n for bound, n in self.token_reuse.evictions.copy().items()}

    def gauges(self) -> dict[str, float]:
        if self.token_reuse is None:
            return {}
        entries, nbytes = self.token_reuse.size  # the model thread may be changing the cache
        return {"reuse_cache_entries": entries, "reuse_cache_mib": round(nbytes / 2**20, 1)}

    def generate(
        self,
        images: list[npt.NDArray[np.uint8]],
        text: Prompt,
        cancel: threading.Event | None = None,
        on_text: OnText | None = None,
        max_new_tokens: int | None = None,
        reuse: tuple[tuple[str, str], str] | None = None,
        clip: tuple[list[int], list[AudioFeatures]] | None = None,
        memory: tuple[str, tuple[MemoryEntry, ...]] | None = None,
        summary_tokens: int = 0,
        on_prompt: Callable[[int], None] | None = None,
        sampling: Sampling | None = None,
    ) -> Generation:
        """Answer ``text`` about ``images`` (one user turn, or a conversation) in the calling thread. With token
        reuse on and ``reuse`` = (cache key, event id), repeated calls recompute only what
        changed (:mod:`stream_rt.mllm.techniques.token_reuse`). ``clip`` = (frame times, audio
        features) compresses a multi-frame request when compression is on. ``memory`` =
        (source id, entries) goes before the prompt (:mod:`stream_rt.mllm.techniques.memory_prefix`).
        ``summary_tokens``: also return the keyframe's visual tokens pooled to that many.
        ``on_prompt`` is told the prompt's length in tokens before decoding starts.
        ``sampling``: how tokens are chosen (default greedy; :class:`Sampling`)."""
        if self.model is None:
            self.load()
        assert self.family is not None
        if not self.family.adapter:
            with self._lock, torch.inference_mode():
                stream = self.token_stream(max_new_tokens, cancel, on_text, sampling)
                return generate_generic(
                    self.model, self.family, images, text, stream, limit=stream.limit, now=self._now,
                    memory=memory[1] if memory is not None else (), summary_tokens=summary_tokens,
                    keyframe=len(images) - 1 if clip is not None else 0, on_prompt=on_prompt,
                )  # fmt: skip
        summary, memory_tokens, visual_dropped, outcome = None, 0, 0, None
        with self._lock, torch.inference_mode():
            # prepare -> encode (tile / encoder reuse) -> compress -> memory prefix -> prefill
            # (token reuse) -> decode (contract stop, layer exit): each step whatever the others do.
            prepared = on_device(self.family.prepare(images, chat_messages(len(images), text), self.model), self.device)
            call = None
            fingerprint = memory_fingerprint(memory[1]) if memory is not None else ""
            if self.token_reuse is not None and reuse is not None:
                key, event_id = reuse
                call = self.token_reuse.begin(self.family, prepared, [rgb_luma(i) for i in images], key, event_id,
                                              fingerprint)  # fmt: skip
            try:
                t0 = time.perf_counter()
                features = None
                if call is not None and self.token_reuse is not None:
                    features = self.token_reuse.encode(call, self.model, self.family, prepared)
                elif prepared.vision:
                    features = self.family.encode(self.model, prepared)
                t1 = self._now()
                if summary_tokens and features is not None:
                    keyframe = len(images) - 1 if clip is not None else 0
                    rows = self._image_rows(prepared, keyframe, len(images))
                    summary = pooled_tokens(features.tokens[rows], summary_tokens)
                kept = None
                if self.compression is not None and clip is not None and features is not None:
                    before = len(features)
                    prepared, features, kept = self.compression.apply(self.family, prepared, features, *clip)
                    visual_dropped = before - len(features)
                prefix = None
                if memory is not None:
                    memory_state = self.memory_prefix.state(self.model, self.family, *memory, fingerprint)
                    prepared, memory_tokens = after_prefix(prepared, memory_state.length), memory_state.length
                    prefix = (memory_state.keys, memory_state.values)
                embeds = self.embed(prepared, features)
                deepstack = features.deepstack if features is not None else ()
                if call is not None:
                    assert self.token_reuse is not None
                    result = self.token_reuse.prefill(call, self.model, prepared, embeds, kept, prefix, deepstack)
                    outcome = self.token_reuse.last
                else:
                    result = run_prefill(self.model, embeds, prepared.position_ids, prepared.image_mask, prefix=prefix,
                                         deepstack=deepstack)  # fmt: skip
            except Exception:
                if call is not None and self.token_reuse is not None:
                    self.token_reuse.reset(call.key)  # a model error starts the next call afresh
                raise
            encode_s, prefill_s = t1 - t0, self._now() - t1
            if on_prompt is not None:
                on_prompt(prepared.length)
            exited = (self.layer_exit.decoded, self.layer_exit.layers_run) if self.layer_exit is not None else (0, 0)
            t2 = time.perf_counter()
            stream = self.token_stream(max_new_tokens, cancel, on_text, sampling)
            ids, text, stop = self.decode(prepared, result.logits, (result.keys, result.values), cancel, on_text,
                                          max_new_tokens, stream)  # fmt: skip
            decode_s = time.perf_counter() - t2
            logits = result.logits
        gen = Generation(
            text, ids, stop, prepared.length, int(prepared.image_mask.sum()), encode_s, prefill_s, decode_s, logits,
            reuse=outcome, memory_tokens=memory_tokens, summary=summary, visual_dropped=visual_dropped,
            logprobs=stream.logprobs,
        )  # fmt: skip
        if self.layer_exit is not None and self.layer_exit.decoded > exited[0]:
            gen.exit_depth = (self.layer_exit.layers_run - exited[1]) / (self.layer_exit.decoded - exited[0])
        return gen

    def _now(self) -> float:
        """The time, once the device has finished what it was given (CUDA runs ahead)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _image_rows(self, prepared: Prepared, image: int, images: int) -> torch.Tensor:
        """Indices of ``image``'s rows among the visual features (in prompt order)."""
        assert self.family is not None
        try:
            grids = self.family.token_grids(prepared)
        except NotImplementedError:  # a family without a mapped grid: images take equal shares
            n = int(prepared.image_mask.sum()) // images
            return torch.arange(image * n, (image + 1) * n)
        rows, offset = [], 0
        for grid in grids:
            if grid.image == image:
                rows.append(torch.arange(offset, offset + grid.size))
            offset += grid.size
        return torch.cat(rows)

    def cache_of(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> Any:
        """A transformers KV cache holding ``keys`` and ``values`` (per layer, the whole
        sequence's). Every layer keeps every position, a sliding-window one too (Gemma 3):
        the model's masks apply the window, as the layer loop does; a cache made from the
        config would keep only a sliding layer's window, which the batch's left padding
        then puts out of step with the mask."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            cache.update(k, v, layer)
        return cache

    def embed(self, prepared: Prepared, features: VisualFeatures | None) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(prepared.input_ids.to(self.device))
        if features is not None:
            mask = prepared.image_mask.to(self.device)
            if int(mask.sum()) != len(features):
                raise BackendError(f"{int(mask.sum())} visual tokens in the prompt for {len(features)} features")
            embeds[0, mask] = features.tokens.to(embeds.dtype)
        return embeds

    def prefill(
        self, prepared: Prepared, features: VisualFeatures | None, prefix: PrefixState | None = None
    ) -> tuple[torch.Tensor, Any]:
        """Run the prompt through the language model, after ``prefix``'s K/V if given;
        (last-position logits, a transformers KV cache of it, for batched decoding)."""
        kv = (prefix.keys, prefix.values) if prefix is not None else None
        result = run_prefill(self.model, self.embed(prepared, features), prepared.position_ids, prepared.image_mask,
                             prefix=kv, deepstack=features.deepstack if features is not None else ())  # fmt: skip
        return result.logits, self.cache_of(result.keys, result.values)

    def decode(
        self,
        prepared: Prepared,
        logits: torch.Tensor,
        cache: KV,
        cancel: threading.Event | None,
        on_text: OnText | None,
        max_new_tokens: int | None = None,
        stream: TokenStream | None = None,
    ) -> tuple[list[int], str, str]:
        """Decoding from the prefill's logits and K/V (``cache``: per layer, the whole
        sequence's), greedy unless ``stream`` (which then chooses the tokens) samples;
        (token ids, text, why it stopped). Each token runs the same layer loop as the
        prefill, with the layer exit when it is on."""
        if stream is None:
            stream = self.token_stream(max_new_tokens, cancel, on_text)
        embed = self.model.get_input_embeddings()
        three_d = prepared.position_ids is not None and prepared.position_ids.dim() == 3
        while (token := stream.take(logits[0])) is not None:
            position = torch.tensor([[prepared.next_position + len(stream.ids) - 1]], device=self.device)
            position = position.expand(3, 1, 1) if three_d else position
            step = run_prefill(self.model, embed(torch.tensor([[token]], device=self.device)), position, prefix=cache,
                               exit=self.layer_exit)  # fmt: skip
            logits, cache = step.logits, (step.keys, step.values)
        return stream.ids, stream.text, stream.stop

    def token_stream(
        self,
        max_new_tokens: int | None = None,
        cancel: threading.Event | None = None,
        on_text: OnText | None = None,
        sampling: Sampling | None = None,
    ) -> TokenStream:
        """A :class:`TokenStream` for one answer of this model (its end-of-sequence tokens,
        token limit and contract stop)."""
        assert self.family is not None
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        return TokenStream(self.family.tokenizer, self.family.eos_ids, limit, contract_stop=self.contract_stop,
                           cancel=cancel, on_text=on_text, sampling=sampling)  # fmt: skip


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


def download_command() -> str:
    """The command the installed huggingface_hub provides to download a model."""
    import importlib.metadata

    scripts = {e.name for e in importlib.metadata.entry_points(group="console_scripts")}
    return "hf download" if "hf" in scripts or "huggingface-cli" not in scripts else "huggingface-cli download"


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


def on_device(prepared: Prepared, device: torch.device) -> Prepared:
    prepared.vision = {k: v.to(device) for k, v in prepared.vision.items()}
    return prepared


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@contextlib.contextmanager
def _quiet_transformers() -> Any:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)

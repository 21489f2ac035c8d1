"""Local Hugging Face vision-language models on CPU or CUDA: the family adapters (Qwen2-VL /
Qwen2.5-VL, Qwen3-VL, SmolVLM / Idefics3, LLaVA, Gemma 3, and Qwen2.5-Omni's and Qwen3-Omni's
thinkers, which also hear a clip's sound) and any other model transformers loads, on the generic path.

The model runs in the backend's own thread with a greedy decoding loop of its own rather than
``generate()``: the vision encoder, prefill and each decoded token are timed apart, text
streams out as it is decoded, a cancel flag is checked at every token, and decoding stops
the moment the answer contract's JSON object closes (``stop="contract"``). On a family
adapter a call is a list of steps — prepare, encode, summarise, compress, prefill, decode —
each taking and returning a typed value (:mod:`stream_rt.mllm.backends.call`), each doing
what its technique (:class:`~stream_rt.mllm.techniques.Techniques`) asks when it is on.

``model`` is a local directory or a hub id. Hub ids are looked up in the local Hugging
Face cache only, unless ``allow_download``; a model that is not there raises
:class:`~stream_rt.mllm.backend.MissingWeights` with one line saying how to provide it.
``model = "smoke"`` builds and uses the smoke model (:mod:`stream_rt.mllm.smoke`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from stream_rt.graph.packets import MllmAnswer, MllmRequest
from stream_rt.media.images import rgb_luma
from stream_rt.mllm.backend import (
    Backend,
    BackendError,
    OnText,
    answer_from_text,
)
from stream_rt.mllm.backends.call import ClipTiming, Decoded, Encoded, Inputs, Prefilled, ReuseKey, SourceMemory
from stream_rt.mllm.backends.decoding import Generation, Sampling, TokenStream
from stream_rt.mllm.backends.generic import generate_generic
from stream_rt.mllm.backends.loading import check_device, describe_model, load_model, resolve_model, torch_dtype
from stream_rt.mllm.models.decoder import run_prefill
from stream_rt.mllm.models.families import Family, HeardFeatures, Prepared, Sound, VisualFeatures
from stream_rt.mllm.models.layer_loop import KV
from stream_rt.mllm.prompt import Prompt, chat_messages, request_text
from stream_rt.mllm.smoke import is_smoke_model
from stream_rt.mllm.techniques import Techniques
from stream_rt.mllm.techniques.memory_prefix import (
    MemoryPrefix,
    PrefixState,
    after_prefix,
    memory_fingerprint,
    pooled_tokens,
)

log = logging.getLogger("stream_rt.mllm")


class TransformersBackend(Backend):
    """A :class:`Backend` running a local Hugging Face vision-language model (a directory, a
    hub id from the local cache, or ``"smoke"``) in a thread of its own, with the family
    adapters' efficiency techniques (``techniques``; default: none); raises
    :class:`MissingWeights` when the weights are not there. ``max_new_tokens`` caps an
    answer, ``contract_stop`` ends it when the contract's JSON object closes, ``threads``
    sets torch's CPU threads. Nothing is loaded until :meth:`start` (or :meth:`load`).
    Importing it imports torch."""

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
        techniques: Techniques | None = None,
    ) -> None:
        techniques = techniques or Techniques()
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
        self.layer_exit = techniques.layer_exit
        self.token_reuse = techniques.token_reuse
        self.compression = techniques.compression
        self.memory_prefix = MemoryPrefix(techniques.memory_text_tokens)
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
        if self.model is not None:  # loaded by a call queued before this one on the model's thread
            return
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if self.threads:
            torch.set_num_threads(self.threads)
        self.device = check_device(self.device_name)
        path, self.name = resolve_model(self.model_ref, self.allow_download)
        self.smoke = is_smoke_model(path)
        dtype = torch_dtype(self.dtype, self.device)
        loaded = load_model(path, self.model_ref, self.techniques, self.device, dtype)
        self.model, self.family, self.cache_kw = loaded.model, loaded.family, loaded.cache_kw
        how = f"{loaded.family.name} adapter" if loaded.family.adapter else "generic path"
        log.info("MLLM: %s (%s, %s) on %s, %s", self.name, loaded.model_type, how, self.device, dtype)
        if self.smoke:  # said once it loaded: a model that cannot load is one line
            log.warning("MLLM: %s has random weights (built by stream_rt): its answers are NOT meaningful", self.name)

    def check(self) -> str:
        """Check, without reading any weight, that the model can be loaded here with the
        configured techniques; a line saying what will run it (:func:`describe_model`).
        Raises :class:`ModelUnavailable` otherwise."""
        check_device(self.device_name)
        return describe_model(self.model_ref, self.allow_download, self.techniques)

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
        reuse = ReuseKey(request.source_id, request.question, request.event_id) if images else None  # nothing to reuse
        clip = (
            ClipTiming(list(request.frame_pts), list(request.audio), request.sound, request.sound_pts_ns)
            if len(request.frame_pts) == len(images) > 1
            else None
        )
        memory = SourceMemory(request.source_id, request.memory) if request.memory else None

        def run() -> Generation:
            return self.generate(images, text, cancel, stream, reuse=reuse, clip=clip, memory=memory,
                                 summary_tokens=request.summary_tokens)  # fmt: skip

        task = asyncio.ensure_future(self.in_model_thread(run))
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
        if gen.audio_tokens:
            extra["audio"] = gen.audio_tokens
        if gen.audio_dropped:
            extra["audio_dropped"] = gen.audio_dropped
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
        *,
        reuse: ReuseKey | None = None,
        clip: ClipTiming | None = None,
        memory: SourceMemory | None = None,
        summary_tokens: int = 0,
        on_prompt: Callable[[int], None] | None = None,
        sampling: Sampling | None = None,
    ) -> Generation:
        """Answer ``text`` about ``images`` (one user turn, or a conversation) in the calling
        thread. With token reuse on and ``reuse`` given, repeated calls recompute only what
        changed (:mod:`stream_rt.mllm.techniques.token_reuse`). ``clip`` compresses a
        multi-frame request when compression is on; its sound goes to a model that hears.
        ``memory`` goes before the prompt (:mod:`stream_rt.mllm.techniques.memory_prefix`).
        ``summary_tokens``: also return the keyframe's visual tokens pooled to that many. ``on_prompt`` is told the
        prompt's length in tokens before decoding starts. ``sampling``: how tokens are
        chosen (default greedy; :class:`Sampling`). On a family adapter the call is the
        steps of :mod:`stream_rt.mllm.backends.call`, each whatever the others do."""
        if self.model is None:
            self.load()
        assert self.family is not None
        with self._lock, torch.inference_mode():
            if not self.family.adapter:
                stream = self.token_stream(max_new_tokens, cancel, on_text, sampling)
                return generate_generic(
                    self.model, self.family, images, text, stream, limit=stream.limit, now=self._now,
                    memory=memory.entries if memory is not None else (), summary_tokens=summary_tokens,
                    keyframe=len(images) - 1 if clip is not None else 0, on_prompt=on_prompt,
                )  # fmt: skip
            sound = clip.sound if clip is not None and self.family.hears else None
            inputs = self.prepare_inputs(images, text, reuse, memory, sound)
            try:
                encoded = self.encode_visual(inputs)
                encoded = self.summarise_keyframe(
                    encoded, summary_tokens, keyframe=len(images) - 1 if clip is not None else 0
                )
                encoded = self.compress_clip(encoded, clip)
                prefilled = self.prefill_prompt(encoded, memory)
            except Exception:
                if inputs.reuse is not None and self.token_reuse is not None:
                    self.token_reuse.reset(inputs.reuse.key)  # a model error starts the next call afresh
                raise
            if on_prompt is not None:
                on_prompt(prefilled.prepared.length)
            decoded = self.decode_answer(prefilled, self.token_stream(max_new_tokens, cancel, on_text, sampling))
        return Generation(
            decoded.text, decoded.token_ids, decoded.stop, prefilled.prepared.length,
            int(prefilled.prepared.image_mask.sum()), encoded.encode_s, prefilled.prefill_s, decoded.decode_s,
            prefilled.logits, exit_depth=decoded.exit_depth, reuse=prefilled.reuse,
            memory_tokens=prefilled.memory_tokens, summary=encoded.summary, visual_dropped=encoded.visual_dropped,
            audio_tokens=len(encoded.heard) if encoded.heard is not None else 0, audio_dropped=encoded.audio_dropped,
            logprobs=decoded.logprobs,
        )  # fmt: skip

    def prepare_inputs(
        self,
        images: list[npt.NDArray[np.uint8]],
        text: Prompt,
        reuse: ReuseKey | None,
        memory: SourceMemory | None,
        sound: Sound | None = None,
    ) -> Inputs:
        """Step 1: the request through the family's processor onto the device (after the
        images, ``sound`` as audio, for a family that hears); with token reuse on and
        ``reuse`` given, the reuse call begun (which tokens are static)."""
        assert self.family is not None
        messages = chat_messages(len(images), text, sound=sound is not None)
        prepared = on_device(self.family.prepare(images, messages, self.model, sound), self.device)
        fingerprint = memory_fingerprint(memory.entries) if memory is not None else ""
        call = None
        if self.token_reuse is not None and reuse is not None:
            call = self.token_reuse.begin(self.family, prepared, [rgb_luma(i) for i in images], reuse.cache_key,
                                          reuse.event_id, fingerprint)  # fmt: skip
        return Inputs(len(images), prepared, call, fingerprint)

    def encode_visual(self, inputs: Inputs) -> Encoded:
        """Step 2: the visual features, reusing the cached tiles or encoder passes it can;
        and the sound's audio features, for a family that hears."""
        assert self.family is not None
        started = time.perf_counter()
        features = None
        if inputs.reuse is not None and self.token_reuse is not None:
            features = self.token_reuse.encode(inputs.reuse, self.model, self.family, inputs.prepared)
        elif inputs.prepared.vision:
            features = self.family.encode(self.model, inputs.prepared)
        heard = self.family.hear(self.model, inputs.prepared) if inputs.prepared.audio_mask is not None else None
        ended = self._now()
        return Encoded(inputs, inputs.prepared, features, ended - started, ended, heard=heard)

    def summarise_keyframe(self, encoded: Encoded, tokens: int, keyframe: int) -> Encoded:
        """Step 3: with ``tokens``, the ``keyframe``'s visual tokens pooled to that many."""
        if not tokens or encoded.features is None:
            return encoded
        assert self.family is not None
        rows = self.family.image_rows(encoded.prepared, keyframe, encoded.inputs.images)
        return replace(encoded, summary=pooled_tokens(encoded.features.tokens[rows], tokens))

    def compress_clip(self, encoded: Encoded, clip: ClipTiming | None) -> Encoded:
        """Step 4: with compression on and a clip, the visual tokens it keeps — and, where
        the model heard the clip, the audio tokens, guided by its audio encoder's attention."""
        if self.compression is None or clip is None or encoded.features is None:
            return encoded
        assert self.family is not None
        heard = encoded.heard
        if heard is not None:
            prepared, features, kept, heard = self.compression.apply_heard(
                self.family, encoded.prepared, encoded.features, heard, clip.frame_pts, clip.sound_pts
            )
        else:
            prepared, features, kept = self.compression.apply(self.family, encoded.prepared, encoded.features,
                                                              clip.frame_pts, clip.audio)  # fmt: skip
        audio_dropped = len(encoded.heard) - len(heard) if encoded.heard is not None and heard is not None else 0
        return replace(encoded, prepared=prepared, features=features, kept=kept, heard=heard,
                       visual_dropped=len(encoded.features) - len(features), audio_dropped=audio_dropped)  # fmt: skip

    def prefill_prompt(self, encoded: Encoded, memory: SourceMemory | None) -> Prefilled:
        """Step 5: the memory's K/V prefix (kept from the last call where it is the same),
        then the prompt through the layer loop, reusing the cached K/V it can."""
        assert self.family is not None
        prepared, prefix, memory_tokens = encoded.prepared, None, 0
        if memory is not None:
            state = self.memory_prefix.state(self.model, self.family, memory.source_id, memory.entries,
                                             encoded.inputs.memory_fingerprint)  # fmt: skip
            prepared, memory_tokens = after_prefix(prepared, state.length), state.length
            prefix = (state.keys, state.values)
        embeds = self.embed(prepared, encoded.features, encoded.heard)
        deepstack = encoded.features.deepstack if encoded.features is not None else ()
        call, outcome = encoded.inputs.reuse, None
        if call is not None and self.token_reuse is not None:
            result = self.token_reuse.prefill(call, self.model, prepared, embeds, encoded.kept, prefix, deepstack)
            outcome = call.outcome
        else:
            result = run_prefill(self.model, embeds, prepared.position_ids, prepared.image_mask, prefix=prefix,
                                 deepstack=deepstack)  # fmt: skip
        return Prefilled(prepared, result.logits, (result.keys, result.values), self._now() - encoded.encoded_at,
                         memory_tokens, outcome)  # fmt: skip

    def decode_answer(self, prefilled: Prefilled, stream: TokenStream) -> Decoded:
        """Step 6: the answer, token by token as ``stream`` chooses and stops it, each token
        through the same layer loop as the prefill, with the layer exit when it is on."""
        started = time.perf_counter()
        embed = self.model.get_input_embeddings()
        prepared, logits, cache = prefilled.prepared, prefilled.logits, prefilled.cache
        three_d = prepared.position_ids is not None and prepared.position_ids.dim() == 3
        depths = []
        while (token := stream.take(logits[0])) is not None:
            position = torch.tensor([[prepared.next_position + len(stream.ids) - 1]], device=self.device)
            position = position.expand(3, 1, 1) if three_d else position
            step = run_prefill(self.model, embed(torch.tensor([[token]], device=self.device)), position, prefix=cache,
                               exit=self.layer_exit)  # fmt: skip
            logits, cache = step.logits, (step.keys, step.values)
            depths.append(step.depth)
        decode_s = time.perf_counter() - started
        exit_depth = sum(depths) / len(depths) if self.layer_exit is not None and depths else None
        return Decoded(stream.ids, stream.text, stream.stop, decode_s, exit_depth, stream.logprobs)

    def _now(self) -> float:
        """The time, once the device has finished what it was given (CUDA runs ahead)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

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

    def embed(
        self, prepared: Prepared, features: VisualFeatures | None, heard: HeardFeatures | None = None
    ) -> torch.Tensor:
        """The prompt's input embeddings, its visual (and audio) tokens' replaced by their features."""
        embeds = self.model.get_input_embeddings()(prepared.input_ids.to(self.device))
        if features is not None:
            mask = prepared.image_mask.to(self.device)
            if int(mask.sum()) != len(features):
                raise BackendError(f"{int(mask.sum())} visual tokens in the prompt for {len(features)} features")
            embeds[0, mask] = features.tokens.to(embeds.dtype)
        if heard is not None and prepared.audio_mask is not None:
            mask = prepared.audio_mask.to(self.device)
            if int(mask.sum()) != len(heard):
                raise BackendError(f"{int(mask.sum())} audio tokens in the prompt for {len(heard)} audio features")
            embeds[0, mask] = heard.tokens.to(embeds.device, embeds.dtype)
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
        (token ids, text, why it stopped): :meth:`decode_answer` for a prefill made apart."""
        if stream is None:
            stream = self.token_stream(max_new_tokens, cancel, on_text)
        decoded = self.decode_answer(Prefilled(prepared, logits, cache, 0.0), stream)
        return decoded.token_ids, decoded.text, decoded.stop

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


def on_device(prepared: Prepared, device: torch.device) -> Prepared:
    prepared.vision = {k: v.to(device) for k, v in prepared.vision.items()}
    return prepared

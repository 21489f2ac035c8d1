"""The generic call path: any model ``AutoModelForImageTextToText`` loads, answered by
transformers' own ``generate``.

The inputs come from the model's own processor and chat template
(:class:`~stream_rt.mllm.models.families.Family`). The :class:`~stream_rt.mllm.backends.decoding.TokenStream`
chooses every token (greedy, or sampled as the request asks) in a logits processor that
leaves ``generate``'s own greedy choice that one token, and takes it back through a
stopping criterion, so text streams out as it is decoded and decoding stops when the
answer contract's JSON object closes, at a stop string, at the token limit, at end of
sequence or when cancelled — tokens are chosen and decoding stops as on the adapters'
path. (``generate``'s own sampling would draw from torch's global random state; the
stream's generator is the request's own, seeded by its ``seed``.) The logits the stream
sees are those ``generate`` hands its logits processors: the model's raw logits, after
only the processors the model's ``generation_config`` turns on for greedy decoding (such
as a repetition penalty). The memory goes in as text before the
question (the adapters put it in as a K/V prefix).

Where the time goes: the vision encoder is timed around the model's
``get_image_features`` (where the model has one), the prefill runs until the first token
is chosen, the rest is decoding.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from stream_rt.mllm.backends.decoding import Generation, TokenStream
from stream_rt.mllm.prompt import Prompt, chat_messages
from stream_rt.mllm.techniques.memory_prefix import memory_lines, pooled_tokens

if TYPE_CHECKING:
    from stream_rt.memory.streaming import MemoryEntry
    from stream_rt.mllm.models.families import Family


class _Criterion:
    """A ``generate`` stopping criterion that feeds each chosen token to ``stream`` and
    notes when the first one came (the end of the prefill)."""

    def __init__(self, stream: TokenStream, now: Callable[[], float]) -> None:
        self.stream = stream
        self.now = now
        self.first_token_at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.first_token_at is None:
            self.first_token_at = self.now()
        going = self.stream.feed(int(input_ids[0, -1]))
        return torch.full((input_ids.shape[0],), not going, dtype=torch.bool, device=input_ids.device)


class _Choice:
    """A ``generate`` logits processor that lets ``stream`` choose the next token and
    leaves greedy decoding no other."""

    def __init__(self, stream: TokenStream) -> None:
        self.stream = stream
        self.first: torch.Tensor | None = None  # the first step's scores (the prompt's last logits)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.stream.stop:  # a step generate takes after the stopping criterion said stop
            return scores
        if self.first is None:
            self.first = scores[0].float().clone()
        token = self.stream.choose(scores[0])
        only = torch.full_like(scores, -torch.inf)
        only[:, token] = 0.0
        return only


def generate_generic(
    model: Any,
    family: Family,
    images: list[npt.NDArray[np.uint8]],
    text: Prompt,
    stream: TokenStream,
    *,
    limit: int,
    now: Callable[[], float],
    memory: tuple[MemoryEntry, ...] = (),
    summary_tokens: int = 0,
    keyframe: int = 0,
    on_prompt: Callable[[int], None] | None = None,
) -> Generation:
    """One answer from ``model.generate``, its tokens chosen and streamed by ``stream``. With
    ``summary_tokens``, the features of image ``keyframe`` are pooled to that many tokens
    (for the memory) when the model's encoder could be observed."""
    if memory:
        if not isinstance(text, str):
            raise ValueError("the memory goes before one question, not a conversation")
        text = memory_lines(memory) + "\n" + text
    inputs = family.inputs(images, chat_messages(len(images), text))
    ids = inputs["input_ids"]
    prompt, visual = int(ids.shape[1]), int((ids == family.image_token_id).sum())
    if on_prompt is not None:
        on_prompt(prompt)
    device, dtype = model.device, model.dtype
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    criterion, choice = _Criterion(stream, now), _Choice(stream)
    encoded: list[tuple[float, Any]] = []
    started = now()
    if not stream.ended():
        pad = family.tokenizer.pad_token_id
        with _timed_encoder(model, encoded, now), _own_choice_only(model):
            model.generate(
                **inputs, max_new_tokens=max(1, limit), do_sample=False, stopping_criteria=[criterion],
                logits_processor=[choice], eos_token_id=sorted(family.eos_ids),
                pad_token_id=pad if pad is not None else int(ids[0, -1]),
            )  # fmt: skip
    ended = now()
    first = criterion.first_token_at if criterion.first_token_at is not None else ended
    encode_s = sum(seconds for seconds, _ in encoded) if encoded else None
    summary = None
    if summary_tokens and encoded:
        features = _image_features(encoded[0][1], keyframe, len(images))
        summary = pooled_tokens(features, summary_tokens) if features is not None else None
    return Generation(
        stream.text, stream.ids, stream.stop, prompt, visual, encode_s, first - started - (encode_s or 0.0),
        ended - first, first_logits=choice.first, summary=summary, logprobs=stream.logprobs,
    )  # fmt: skip


@contextlib.contextmanager
def _own_choice_only(model: Any) -> Iterator[None]:
    """While the block runs, the model's ``generate`` has none of its checkpoint's
    generation defaults (sampling, repetition penalty and the like, which ``generate``
    would otherwise apply to the scores before any processor of ours sees them): tokens
    are chosen as the request says, as on the adapters' path, and log-probabilities are
    the model's own."""
    from transformers import GenerationConfig

    kept = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=kept.bos_token_id)
    try:
        yield
    finally:
        model.generation_config = kept


@contextlib.contextmanager
def _timed_encoder(model: Any, calls: list[tuple[float, Any]], now: Callable[[], float]) -> Iterator[None]:
    """Time every call of the model's ``get_image_features`` (and keep what it returned)
    while the block runs. The model's forward calls it on its inner model."""
    inner = getattr(model, "model", None)
    target = inner if inner is not None and hasattr(inner, "get_image_features") else model
    original = getattr(target, "get_image_features", None)
    if original is None:
        yield
        return
    lock = threading.Lock()

    @functools.wraps(original)  # generate reads the encoder's signature to pick its arguments
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = now()
        out = original(*args, **kwargs)
        with lock:
            calls.append((now() - t0, out))
        return out

    target.get_image_features = timed
    try:
        yield
    finally:
        del target.get_image_features


def _image_features(out: Any, keyframe: int, images: int) -> torch.Tensor | None:
    """Image ``keyframe``'s features, (tokens, dim), from what ``get_image_features``
    returned: a tensor (images first, or all tokens), a list per image (or per tile), or an
    output object holding either. Where images cannot be told apart, all of them."""
    features = getattr(out, "pooler_output", None)
    if features is None:
        features = out[0] if isinstance(out, tuple) and out and isinstance(out[0], list | tuple) else out
    if isinstance(features, list | tuple):
        if not features or not all(isinstance(f, torch.Tensor) for f in features):
            return None
        if len(features) == images:
            return features[keyframe].reshape(-1, features[keyframe].shape[-1])
        # per tile rather than per image: the tiles of every image, which stand for the keyframe
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    if not isinstance(features, torch.Tensor):
        return None
    if features.dim() >= 3 and features.shape[0] == images:
        return features[keyframe].reshape(-1, features.shape[-1])
    return features.reshape(-1, features.shape[-1])

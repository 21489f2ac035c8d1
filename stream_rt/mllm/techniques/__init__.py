"""The efficiency techniques of the transformers backend, each plugged into the one layer
loop (:mod:`stream_rt.mllm.models.layer_loop`): temporal token and tile reuse
(:mod:`.token_reuse`, :mod:`.tile_reuse`), audio-guided clip compression
(:mod:`.compression`), the streaming memory's K/V prefix (:mod:`.memory_prefix`) and the
early layer exit while decoding (:mod:`.layer_exit`)."""

from __future__ import annotations

from dataclasses import dataclass

from stream_rt.mllm.techniques.compression import Compression
from stream_rt.mllm.techniques.layer_exit import LayerExit
from stream_rt.mllm.techniques.token_reuse import TokenReuse


@dataclass(frozen=True)
class Techniques:
    """The techniques a :class:`~stream_rt.mllm.backends.transformers_backend.TransformersBackend`
    runs with (``None``: off); each needs a family adapter, and the backend refuses to load
    a model on the generic path with any of them on. The memory prefix is always there for
    a request with memory: ``memory_text_tokens`` caps each entry's text in it."""

    token_reuse: TokenReuse | None = None
    compression: Compression | None = None
    layer_exit: LayerExit | None = None
    memory_text_tokens: int = 32

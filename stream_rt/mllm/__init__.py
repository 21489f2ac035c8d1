"""The MLLM stage and its backends.

Its wings: ``stage/`` (the node and the small classes it composes) and ``worker/`` (the
OpenAI-compatible server); ``backends/`` (the transformers backend as a list of steps, the
OpenAI-compatible client, decoding, batching); ``models/`` (the families and their
adapters, processors, the one layer loop); ``techniques/`` (token and tile reuse,
compression, the memory prefix, the layer exit). At the top: the interface every backend
implements (``backend``, ``contract``, ``prompt``, ``model_thread``), and ``smoke`` and
``tiny_models``, which build random-weight models.

Importing this package does not import torch: :class:`TransformersBackend` and
:func:`build_smoke_model` load it on first use (the ``mllm`` extra).
"""

from typing import Any

from stream_rt.mllm.backend import Backend, BackendError, MissingWeights, ModelUnavailable
from stream_rt.mllm.backends.openai_backend import OpenAIBackend
from stream_rt.mllm.stage import MllmStage

__all__ = [
    "Backend",
    "BackendError",
    "MissingWeights",
    "MllmStage",
    "ModelUnavailable",
    "OpenAIBackend",
    "TransformersBackend",
    "build_smoke_model",
]


def __getattr__(name: str) -> Any:
    if name == "TransformersBackend":
        from stream_rt.mllm.backends.transformers_backend import TransformersBackend

        return TransformersBackend
    if name == "build_smoke_model":
        from stream_rt.mllm.smoke import build_smoke_model

        return build_smoke_model
    raise AttributeError(f"module 'stream_rt.mllm' has no attribute '{name}'")

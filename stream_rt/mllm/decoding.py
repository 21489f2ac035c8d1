"""Greedy decoding of one answer, token by token: which token comes next, the text so far,
and why decoding stopped. The backend's own decode loop and the worker's batch (many
answers, one forward pass per step) share it, so both stop for the same reasons."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from stream_rt.mllm.contract import JsonObjectEnd


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
        if self._cancel is not None and self._cancel.is_set():
            self.stop = "cancelled"
        elif len(self.ids) >= self._limit:
            self.stop = "max_tokens"
        elif (token := int(logits.argmax())) in self._eos:
            self.stop = "eos"
        else:
            self.ids.append(token)
            new_text = str(self._tokenizer.decode(self.ids, skip_special_tokens=True))
            piece, self.text = new_text[len(self.text) :], new_text
            if piece and self._on_text is not None:
                self._on_text(piece)
            if self._contract is not None and self._contract.feed(piece):
                self.stop = "contract"
            elif len(self.ids) >= self._limit:
                self.stop = "max_tokens"
            else:
                return token
        return None

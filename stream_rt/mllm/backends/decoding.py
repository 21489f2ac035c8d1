"""Decoding one answer, token by token: which token comes next, the text so far, and why
decoding stopped. The backend's own decode loop, the worker's batch (many answers, one
forward pass per step) and the generic path (transformers' ``generate``, which asks
:meth:`TokenStream.choose` for each token through a logits processor and hands it back to
:meth:`TokenStream.feed`) share it, so all choose tokens the same way and stop for the
same reasons.

How a token is chosen is a :class:`Sampling`: greedy by default (the daemon's calls);
a request of the worker may ask for OpenAI's temperature / top_p sampling (from a
``torch.Generator`` of the request's own, seeded by ``seed`` when given), presence and
frequency penalties, a logit bias, stop strings, and the log-probabilities of the chosen
tokens. Log-probabilities are those of the model's **raw** distribution — the
log-softmax of the logits before the bias, the penalties, the temperature and top_p (as
vLLM's default ``logprobs_mode = "raw_logprobs"``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from stream_rt.mllm.contract import JsonObjectEnd

if TYPE_CHECKING:
    from stream_rt.mllm.techniques.token_reuse import ReuseOutcome


@dataclass
class Generation:
    """What one call produced, with where the time went (``encode_s`` is ``None`` where
    the vision encoder's time could not be told apart from the prefill's)."""

    text: str
    token_ids: list[int]
    stop: str  # contract | eos | stop_string | max_tokens | cancelled
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
    audio_tokens: int = 0  # audio tokens in the prompt (a model that hears the clip), after compression
    audio_dropped: int = 0  # audio tokens compression left out
    summary: npt.NDArray[np.float32] | None = None  # the keyframe's pooled visual tokens
    logprobs: list[TokenLogprob] | None = None  # per token of ``text``, when the sampling asked for them


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen, and what is told about them, beyond the answer contract and
    the token limit (the fields of OpenAI's chat completions). The defaults are greedy
    decoding with nothing more."""

    temperature: float = 0.0  # 0: greedy (the most likely token)
    top_p: float = 1.0  # sample from the smallest set of tokens holding this much probability
    seed: int | None = None  # the same seed, prompt and model give the same tokens
    stop: tuple[str, ...] = ()  # decoding ends when the text holds one; the text ends before it
    logprobs: int | None = None  # None: none; n: the chosen token's and the n most likely tokens'
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated already
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated already
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


@dataclass(frozen=True)
class TokenLogprob:
    """One chosen token's log-probability and its bytes, with the ``top`` most likely
    tokens' (text, log-probability, bytes)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float, bytes], ...] = ()
    raw: bytes = b""


class Piece(str):
    """A piece of text as :class:`TokenStream` hands it to ``on_text``: a ``str``, with the
    log-probabilities of the tokens it completes when the sampling asked for them (then a
    piece may also be empty: tokens whose text a stop string cut off), and how many tokens
    had been decoded when it was handed over."""

    logprobs: tuple[TokenLogprob, ...] = ()
    tokens: int = 0

    def __new__(cls, text: str, logprobs: tuple[TokenLogprob, ...] = (), tokens: int = 0) -> Piece:
        piece = super().__new__(cls, text)
        piece.logprobs, piece.tokens = logprobs, tokens
        return piece


class TokenStream:
    """``take(logits)`` gives the token to feed the model next, or ``None`` once decoding
    ends; :attr:`stop` then says why: ``eos``, ``contract`` (the answer's JSON object
    closed, with ``contract_stop``), ``stop_string`` (the text holds one of the sampling's
    stop strings; :attr:`text` ends before it), ``max_tokens`` or ``cancelled``. Text goes
    to ``on_text`` as it is decoded, except what may still turn out to be the start of a
    stop string or an unfinished character: that is held back until it cannot."""

    def __init__(
        self,
        tokenizer: Any,
        eos_ids: set[int] | frozenset[int],
        limit: int,
        *,
        contract_stop: bool,
        cancel: threading.Event | None = None,
        on_text: Callable[[str], None] | None = None,
        sampling: Sampling | None = None,
    ) -> None:
        self.ids: list[int] = []
        self.text = ""
        self.stop = ""
        self.sampling = sampling or GREEDY
        self.logprobs: list[TokenLogprob] | None = [] if self.sampling.logprobs is not None else None
        self.limit = limit
        self._tokenizer, self._eos = tokenizer, eos_ids
        self._contract = JsonObjectEnd() if contract_stop else None
        self._cancel, self._on_text = cancel, on_text
        self._raw = ""  # the decoded text, before a stop string cuts it
        self._sent = 0  # characters of text given to on_text
        self._starts: list[int] = []  # per logprobs entry: where its token's text begins
        self._unsent = 0  # logprobs entries not yet given to on_text
        self._chosen: tuple[int, TokenLogprob] | None = None  # the last choice's log-probability
        self._generator: torch.Generator | None = None
        self._counts: dict[int, int] = {}  # generated tokens, for the penalties

    def take(self, logits: torch.Tensor) -> int | None:
        """The next token from the last position's ``logits`` (one row), or ``None``: done."""
        if self.ended():
            return None
        token = self.choose(logits)
        return token if self.feed(token) else None

    def choose(self, logits: torch.Tensor) -> int:
        """The token the sampling picks from ``logits`` (one row); noted, with its
        log-probability, for when it is fed."""
        sampling = self.sampling
        scores = logits.float()
        adjusted = scores
        if sampling.logit_bias or (self._counts and (sampling.presence_penalty or sampling.frequency_penalty)):
            adjusted = scores.clone()
            for token, bias in sampling.logit_bias.items():
                adjusted[token] += bias
            if self._counts and (sampling.presence_penalty or sampling.frequency_penalty):
                ids = torch.tensor(list(self._counts), device=scores.device)
                counts = torch.tensor(list(self._counts.values()), dtype=scores.dtype, device=scores.device)
                adjusted[ids] -= counts * sampling.frequency_penalty + sampling.presence_penalty
        if sampling.greedy:
            token = int(adjusted.argmax())
        else:
            token = int(torch.multinomial(self._probabilities(adjusted), 1, generator=self._rng(scores.device)))
        if self.logprobs is not None:
            self._chosen = (token, self._logprob(scores, token))
        return token

    def ended(self) -> bool:
        """Whether decoding must end before another token (cancelled, or at its limit)."""
        if not self.stop:
            if self._cancel is not None and self._cancel.is_set():
                self._end("cancelled")
            elif len(self.ids) >= self.limit:
                self._end("max_tokens")
        return bool(self.stop)

    def feed(self, token: int) -> bool:
        """Take ``token`` as the one decoded next (however it was chosen); false once
        decoding has ended (:attr:`stop` says why)."""
        if self.ended():
            return False
        chosen, self._chosen = self._chosen, None
        if token in self._eos:
            self._end("eos")
            return False
        if self.logprobs is not None and chosen is not None and chosen[0] == token:
            self.logprobs.append(chosen[1])
            self._starts.append(len(self._raw))
        self.ids.append(token)
        self._counts[token] = self._counts.get(token, 0) + 1
        before = self.text
        self._raw = str(self._tokenizer.decode(self.ids, skip_special_tokens=True))
        cut = self._stop_string_at(len(before))
        self.text = self._raw if cut is None else self._raw[:cut]
        piece = self.text[len(before) :]
        if cut is not None:
            self._end("stop_string")
        elif self._contract is not None and self._contract.feed(piece):
            self._end("contract")
        elif len(self.ids) >= self.limit:
            self._end("max_tokens")
        else:
            self._send()
        return not self.stop

    def _end(self, reason: str) -> None:
        self.stop = reason
        if reason == "stop_string" and self.logprobs is not None:  # tokens wholly in the cut-off text
            kept = sum(1 for start in self._starts if start < len(self.text))
            del self.logprobs[kept:], self._starts[kept:]
        self._send()

    def _send(self) -> None:
        """Give ``on_text`` the text that can no longer change, with its tokens' log-probabilities."""
        end = len(self.text)
        if not self.stop:
            end -= _held_back(self.text, self.sampling.stop)
        entries: tuple[TokenLogprob, ...] = ()
        if self.logprobs is not None:
            upto = len(self.logprobs) if self.stop else sum(1 for start in self._starts if start < end)
            entries = tuple(self.logprobs[self._unsent : upto])
            self._unsent = max(self._unsent, upto)
        text = self.text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        if (text or entries) and self._on_text is not None:
            self._on_text(Piece(text, entries, len(self.ids)))

    def _stop_string_at(self, before: int) -> int | None:
        """Where the first stop string begins in the text, if one ends in what the last token added."""
        stops = self.sampling.stop
        if not stops:
            return None
        start = max(0, before - max(map(len, stops)) + 1)
        found = [i for i in (self._raw.find(s, start) for s in stops) if i >= 0]
        return min(found) if found else None

    def _probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """The distribution sampled from: softmax at the temperature, cut to top_p."""
        probs = torch.softmax(scores / self.sampling.temperature, dim=-1)
        if self.sampling.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            before = ordered.cumsum(0) - ordered  # the probability of the tokens more likely than each
            drop = before >= self.sampling.top_p
            drop[0] = False  # the most likely token always stays
            probs = probs.scatter(0, order, ordered.masked_fill(drop, 0.0))
        return probs

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            if self.sampling.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.sampling.seed)
        return self._generator

    def _logprob(self, scores: torch.Tensor, token: int) -> TokenLogprob:
        logprobs = torch.log_softmax(scores, dim=-1)
        top: tuple[tuple[str, float, bytes], ...] = ()
        if self.sampling.logprobs:
            values, ids = logprobs.topk(self.sampling.logprobs)
            top = tuple((self._token_text(int(i)), float(v), token_bytes(self._tokenizer, int(i)))
                        for v, i in zip(values, ids, strict=True))  # fmt: skip
        return TokenLogprob(self._token_text(token), float(logprobs[token]), top, token_bytes(self._tokenizer, token))

    def _token_text(self, token: int) -> str:
        return str(self._tokenizer.decode([token]))


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """The bytes ``token`` stands for — for a byte-level BPE, those its symbols encode
    (a token may hold part of a UTF-8 character); a SentencePiece byte token (``<0xNN>``),
    that byte; otherwise its text's UTF-8."""
    piece = str(tokenizer.convert_ids_to_tokens(token))
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    table = _byte_level()
    if type(decoder).__name__ == "ByteLevel" and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        with contextlib.suppress(ValueError):
            return bytes([int(piece[3:5], 16)])
    return str(tokenizer.decode([token])).encode()


@functools.cache
def _byte_level() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is written as, back to the byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` must wait: an unfinished character (the
    tokenizer's replacement character, until the next byte arrives) or what may be the
    start of a stop string."""
    held = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held

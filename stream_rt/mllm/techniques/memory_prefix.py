"""The streaming memory as a prompt prefix whose KV cache is reused while it has not
changed.

A source's memory entries (:mod:`stream_rt.memory`) go before the chat prompt as one
prefix of embeddings: a header line, then per entry a line of text (its time span and
what was said then, cut to ``text_tokens`` tokens) followed by its pooled visual tokens,
which are already in the language model's embedding space. Its length is bounded by the
memory's size — ``max_entries * (text_tokens + tokens + 1)`` plus the header — however
long the daemon runs.

The prefix takes positions ``0 .. P-1`` and the prompt follows at ``P``; because
attention is causal, the K/V of a stretch of the prefix depend on what comes before it
alone. They are computed once and kept per source with a fingerprint of each entry: a
later call whose memory has the same entries starts from them and prefills only its own
prompt, and one whose memory kept its first entries — new ones added since, the usual
case as answers add entries — computes only the entries after the last one it shares
(a merge of two entries recomputes from there on).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stream_rt.mllm.models.decoder import run_prefill
from stream_rt.mllm.models.families import Family, Prepared

if TYPE_CHECKING:
    from stream_rt.memory.streaming import MemoryEntry

HEADER = "Memory of this source, oldest first:\n"


@dataclass
class PrefixState:
    fingerprint: str
    length: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    entries: tuple[str, ...] = ()  # each entry's fingerprint, oldest first
    ends: tuple[int, ...] = ()  # the prefix's length after the header, then after each entry


class MemoryPrefix:
    def __init__(self, text_tokens: int = 32) -> None:
        self.text_tokens = text_tokens
        self.reused = 0  # calls that started from a kept prefix
        self.extended = 0  # calls that kept the first entries' K/V and computed the rest
        self.computed = 0  # calls that had to compute theirs
        self._kept: dict[str, PrefixState] = {}

    def clear(self, source_id: str | None = None) -> None:
        if source_id is None:
            self._kept.clear()
        else:
            self._kept.pop(source_id, None)

    def state(
        self, model: Any, family: Family, source_id: str, entries: tuple[MemoryEntry, ...], fingerprint: str = ""
    ) -> PrefixState:
        """The prefix K/V for ``entries`` (whose :func:`memory_fingerprint` the caller may
        have): kept from an earlier call if they are the same, computed only past the
        entries it shares with the kept one otherwise."""
        fingerprint = fingerprint or memory_fingerprint(entries)
        kept = self._kept.get(source_id)
        if kept is not None and kept.fingerprint == fingerprint:
            self.reused += 1
            return kept
        marks = tuple(entry_fingerprint(e) for e in entries)
        shared = 0
        if kept is not None:
            shared = next((i for i, (a, b) in enumerate(zip(kept.entries, marks, strict=False)) if a != b),
                          min(len(kept.entries), len(marks)))  # fmt: skip
        parts = self.parts(model, family, entries[shared:], header=kept is None)
        if not parts:  # the kept memory's first entries, and nothing after them
            assert kept is not None
            end = kept.ends[shared]
            state = PrefixState(fingerprint, end, [k[:, :, :end] for k in kept.keys],
                                [v[:, :, :end] for v in kept.values], marks, kept.ends[: shared + 1])  # fmt: skip
            self._kept[source_id] = state
            self.extended += 1
            return state
        embeds = torch.cat(parts)[None]
        if kept is None:
            result = run_prefill(model, embeds, prefix_positions(embeds.shape[1], family, embeds.device))
            ends = tuple(int(n) for n in np.cumsum([len(p) for p in parts]))
            self.computed += 1
        else:
            start = kept.ends[shared]
            before = ([k[:, :, :start] for k in kept.keys], [v[:, :, :start] for v in kept.values])
            positions = prefix_positions(embeds.shape[1], family, embeds.device, start)
            result = run_prefill(model, embeds, positions, prefix=before)
            ends = (*kept.ends[: shared + 1], *(start + int(n) for n in np.cumsum([len(p) for p in parts])))
            self.extended += 1
        state = PrefixState(fingerprint, ends[-1], result.keys, result.values, marks, ends)
        self._kept[source_id] = state
        return state

    def embeds(self, model: Any, family: Family, entries: tuple[MemoryEntry, ...]) -> torch.Tensor:
        """(1, P, hidden): the header, then each entry's text line and visual tokens."""
        return torch.cat(self.parts(model, family, entries))[None]

    def parts(self, model: Any, family: Family, entries: tuple[MemoryEntry, ...], header: bool = True
              ) -> list[torch.Tensor]:  # fmt: skip
        """The prefix's embeddings in pieces: the header (if ``header``), then one per
        entry (its text line, its visual tokens, a line break)."""
        embed = model.get_input_embeddings()
        device, dtype = embed.weight.device, embed.weight.dtype

        def text(s: str, limit: int | None = None) -> torch.Tensor:
            ids = family.tokenizer(s, add_special_tokens=False)["input_ids"][:limit]
            return embed(torch.tensor([ids], device=device))[0]

        parts = [text(HEADER)] if header else []
        for entry in entries:
            visual = torch.from_numpy(entry.visual).to(device=device, dtype=dtype)
            parts.append(torch.cat([text(entry_line(entry), self.text_tokens), visual, text("\n")]))
        return parts


def entry_line(entry: MemoryEntry) -> str:
    """An entry's text line: its time span and what was said or summarised then."""
    return f"[{entry.start_ns / 1e9:.1f}-{entry.end_ns / 1e9:.1f} s] {entry.text}".strip()


def memory_lines(entries: tuple[MemoryEntry, ...]) -> str:
    """The memory as text (for models without the K/V prefix): the header, a line per entry."""
    return HEADER + "".join(entry_line(e) + "\n" for e in entries)


def prefix_positions(length: int, family: Family, device: torch.device, start: int = 0) -> torch.Tensor:
    """Text-like position ids start..start+length-1 (all three M-RoPE axes alike for Qwen2-VL)."""
    positions = torch.arange(start, start + length, device=device)[None]
    return positions.expand(3, 1, length) if family.mrope else positions


def after_prefix(prepared: Prepared, length: int) -> Prepared:
    """``prepared`` moved to start at position ``length``."""
    if prepared.position_ids is not None:
        positions = prepared.position_ids + length
    else:
        positions = torch.arange(length, length + prepared.length)[None]
    return replace(prepared, position_ids=positions, next_position=prepared.next_position + length)


def pooled_tokens(features: torch.Tensor, tokens: int) -> np.ndarray:
    """``features`` (n, dim) averaged down to (tokens, dim) along the prompt order."""
    pooled = torch.nn.functional.adaptive_avg_pool1d(features.detach().float().T[None], tokens)[0].T
    return pooled.cpu().numpy().astype(np.float32)


def entry_fingerprint(entry: MemoryEntry) -> str:
    """What identifies an entry's stretch of the prefix: its span, weight, text and tokens."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{entry.start_ns}:{entry.end_ns}:{entry.weight}:{entry.text}\x00".encode())
    h.update(np.ascontiguousarray(entry.visual).tobytes())
    return h.hexdigest()


def memory_fingerprint(entries: tuple[MemoryEntry, ...]) -> str:
    """What identifies a memory's prefix: its entries' fingerprints, in order."""
    return hashlib.blake2b("".join(entry_fingerprint(e) for e in entries).encode(), digest_size=16).hexdigest()

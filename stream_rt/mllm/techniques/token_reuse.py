"""Temporal token reuse (VLA-Cache style) for the transformers backend: repeated calls on
one source recompute only what changed, without forking transformers.

Per cache key (source, question) the previous call leaves: its prompt's token ids, each
visual token's reference patch (its footprint's luma, area-downscaled to 14x14, as last
computed), the K/V of every layer for the whole prompt, the question's attention to each
visual token, and
(tiled families) each tile's pixels and encoder output. The next call:

1. finds the **static** visual tokens (cosine similarity to their reference patch >=
   ``static_threshold`` and mean difference <= ``max_patch_difference`` luma levels,
   :mod:`stream_rt.operators.token_reuse`);
2. drops from them the **relevant** ones — the top ``relevant_share`` by the attention the
   question paid them last time — which are always recomputed;
3. **encodes** only what changed (SmolVLM/Idefics3, whose encoder works per tile — tile
   reuse; the other adapters' encoders see the whole image, so they encode it whole):
   ``tiles="exact"`` reuses a tile whose pixels are identical, bit for bit; ``"static"``
   also one whose tokens are all static; with ``encoder_partial`` a tile with some
   changed tokens goes through the vision encoder with the same trick as below — its
   unchanged patches stop being queries from ``start_layer`` on and keep their previous
   K/V and output;
4. runs the prefill layer by layer (:func:`~stream_rt.mllm.models.decoder.run_prefill`): every
   position is computed in the first ``start_layer`` layers; from there the reused tokens
   stop being queries and keep the previous K/V in that layer and every later one, while
   the recomputed tokens still attend to them (within their layer's window, and both ways
   among an image's tokens for Gemma 3). Qwen3-VL's DeepStack features are added to the
   visual tokens still computed after each early layer; a reused token gets none past
   its last computed layer — its K/V there are the previous call's, made with its
   previous additions. ``schedule="entropy"`` reuses a growing
   share per layer, from the attention entropy of the last full call (VLA-Cache:
   1 - min-max-normalised entropy, increases damped by 0.55); ``"fixed"`` reuses every
   static token from ``start_layer`` on.

The cache is reset — and the call is a plain full one — on a new episode (another event
id), another memory before the prompt, a changed image layout (the prompt up to its last
visual token: the visual tokens' K/V depend on nothing after them, so the event's context
line and the question may change), a model error, or when more than ``max_changed`` of
the visual tokens changed. The cache is kept per (source, question).

The cache is bounded: at most ``max_entries`` keys, ``max_entries_per_source`` of them for
one source, and ``max_mib`` MiB of the tensors and arrays the entries hold (K/V, patches,
tile pixels, features and states, relevance). Past a bound the least recently used entry
goes; past a source's own bound it is that source's least recently used question asked
only once (an ``ask``) that goes, before one asked repeatedly (the routine question). An
entry larger than ``max_mib`` on its own is not kept. Evictions are counted by bound in
:attr:`TokenReuse.evictions`, and per call in :attr:`ReuseOutcome.evicted`.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from stream_rt.config import TokenReuseConfig
from stream_rt.mllm.models.decoder import PrefillResult, run_prefill
from stream_rt.mllm.models.families import Family, Prepared, TileState, VisualFeatures
from stream_rt.mllm.models.layer_loop import KV
from stream_rt.mllm.techniques.tile_reuse import encode_tiles
from stream_rt.operators.token_reuse import TokenGrid, patch_similarity, static_tokens, token_patches

ENTROPY_DAMPING = 0.55


@dataclass
class _Entry:
    event_id: str
    input_ids: torch.Tensor  # the request's up to its last visual token (what the visual K/V depend on)
    patches: npt.NDArray[np.uint8]  # (visual tokens, 14, 14): what each token was computed from
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    relevance: torch.Tensor | None
    tile_pixels: list[torch.Tensor] = field(default_factory=list)
    tile_features: list[VisualFeatures] = field(default_factory=list)
    tile_states: list[TileState | None] = field(default_factory=list)
    layer_ratios: list[float] | None = None  # entropy schedule, from the last full call
    calls: int = 1  # calls under this key while it was cached
    kept: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, np.intp))  # per prompt visual token
    at: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))  # its position in the prompt
    prefix: str = ""  # fingerprint of what went before the prompt (the memory)
    nbytes: int = 0  # of the tensors and arrays above (:func:`_held_bytes`)


@dataclass
class ReuseCall:
    """One call under way, between :meth:`TokenReuse.begin` and :meth:`TokenReuse.prefill`."""

    key: tuple[str, str]
    event_id: str
    prefix: str
    input_ids: torch.Tensor  # the request's up to its last visual token, before compression
    entry: _Entry | None
    grids: list[TokenGrid]
    patches: npt.NDArray[np.uint8]  # per visual token before compression
    static: npt.NDArray[np.bool_]
    why: str  # why it is a full call ("" when it may reuse)
    tiles_reused: int = 0
    tile_pixels: list[torch.Tensor] = field(default_factory=list)
    tile_features: list[VisualFeatures] = field(default_factory=list)
    tile_states: list[TileState | None] = field(default_factory=list)
    outcome: ReuseOutcome | None = None  # what the call reused, once :meth:`TokenReuse.prefill` ran


@dataclass
class ReuseOutcome:
    """What one call reused (for answers, metrics and benchmarks)."""

    mode: str  # full (why) | reuse
    visual_tokens: int = 0
    static_tokens: int = 0
    reused_tokens: int = 0
    tiles: int = 0
    tiles_reused: int = 0
    computed_share: float = 1.0
    evicted: int = 0  # cache entries this call's entry pushed out (itself, if too large to keep)


class TokenReuse:
    """The reuse cache, one entry per (source, question) key, and the calls that use it.
    ``evictions`` counts the entries evicted so far by the bound that evicted them:
    ``source`` (``max_entries_per_source``), ``entries`` (``max_entries``), ``bytes``
    (``max_mib``). A call's outcome is its :attr:`ReuseCall.outcome`; ``last`` is the
    latest call's, for tests and benchmarks."""

    def __init__(self, settings: TokenReuseConfig | None = None) -> None:
        """``settings``: the ``[mllm.token_reuse]`` section (``enabled`` is the pipeline's to read)."""
        self.settings = settings or TokenReuseConfig()
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()  # least recently used first
        self.evictions: Counter[str] = Counter()
        self.size = (0, 0)  # (entries, bytes) after the last change: safe to read from another thread
        self.last = ReuseOutcome("none")

    @property
    def entries(self) -> int:
        """Keys cached now."""
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors and arrays the cache holds."""
        return sum(e.nbytes for e in self._entries.values())

    def reset(self, key: tuple[str, str] | None = None) -> None:
        if key is None:
            self._entries.clear()
        else:
            self._entries.pop(key, None)
        self.size = (self.entries, self.nbytes)

    def encode_and_prefill(
        self,
        model: Any,
        family: Family,
        prepared: Prepared,
        lumas: list[npt.NDArray[np.uint8]],
        key: tuple[str, str],
        event_id: str,
        embed: Any,
    ) -> tuple[PrefillResult, float, float]:
        """Encode and prefill one request, reusing what it can; (result, encode s, prefill s).
        ``embed(prepared, features)`` builds the input embeddings. (The three steps of
        :meth:`begin`, :meth:`encode` and :meth:`prefill`, with nothing between them.)"""
        call = self.begin(family, prepared, lumas, key, event_id)
        t0 = time.perf_counter()
        features = self.encode(call, model, family, prepared)
        t1 = time.perf_counter()
        result = self.prefill(call, model, prepared, embed(prepared, features),
                              deepstack=features.deepstack if features is not None else ())  # fmt: skip
        return result, t1 - t0, time.perf_counter() - t1

    def begin(
        self,
        family: Family,
        prepared: Prepared,
        lumas: list[npt.NDArray[np.uint8]],
        key: tuple[str, str],
        event_id: str,
        prefix: str = "",
    ) -> ReuseCall:
        """Start a call for ``prepared`` (before compression, if any): which of its visual
        tokens are static against the cached entry's, and whether it must be a full call.
        ``prefix`` fingerprints what goes before the prompt (the memory): another prefix
        makes a full call. The entry leaves the cache until :meth:`prefill` succeeds."""
        s = self.settings
        entry = self._entries.pop(key, None)
        self.size = (self.entries, self.nbytes)
        grids = family.token_grids(prepared)
        patches = token_patches(lumas, grids)
        head = _head(prepared)
        why = _full_reason(entry, head, event_id, patches, prefix)
        static = np.zeros(len(patches), bool)
        if entry is not None and not why:
            static = static_tokens(entry.patches, patches, s.static_threshold, s.max_patch_difference)
            if 1 - static.mean() > s.max_changed:
                why = "too much changed"
        return ReuseCall(key, event_id, prefix, head, entry, grids, patches, static, why)

    def encode(self, call: ReuseCall, model: Any, family: Family, prepared: Prepared) -> VisualFeatures | None:
        """The visual features of ``call``'s request, reusing the entry's tiles it can."""
        tiles = encode_tiles(model, family, prepared, call, self.settings)
        call.tiles_reused, call.tile_pixels, call.tile_features, call.tile_states = (
            tiles.reused, tiles.pixels, tiles.tile_features, tiles.states
        )  # fmt: skip
        return tiles.features

    def prefill(
        self,
        call: ReuseCall,
        model: Any,
        prepared: Prepared,
        embeds: torch.Tensor,
        kept: npt.NDArray[np.intp] | None = None,
        prefix: KV | None = None,
        deepstack: tuple[torch.Tensor, ...] = (),
    ) -> PrefillResult:
        """Prefill ``prepared`` — the request as it goes to the model: compressed (``kept``:
        which of the tokens :meth:`begin` saw each visual token is), after ``prefix``'s
        K/V, with its visual features' ``deepstack`` rows (Qwen3-VL) — reusing the entry's
        K/V of the positions that hold the same static token as last time; then keep this
        call as the entry."""
        s = self.settings
        entry, why = call.entry, call.why
        visual = torch.nonzero(prepared.image_mask.cpu()).flatten()
        kept = np.arange(len(call.patches)) if kept is None else np.asarray(kept)
        n_layers = len(model.get_decoder().layers)
        mid = n_layers // 2
        if not why and entry is not None and len(entry.kept) != len(kept):
            why = "layout changed"  # compression kept another number of tokens
        if why:
            result = run_prefill(model, embeds, prepared.position_ids, prepared.image_mask, prefix=prefix,
                                 relevance_layer=mid, entropy=s.schedule == "entropy", deepstack=deepstack)  # fmt: skip
            ratios = _entropy_schedule(result.entropy, s.start_layer) if result.entropy is not None else None
            reference = call.patches
            outcome = ReuseOutcome(f"full ({why})", len(visual), 0, 0, len(call.tile_pixels), call.tiles_reused, 1.0)
        else:
            assert entry is not None
            # A position is reusable when it holds the same token as last time, and that token is static.
            reusable = (entry.kept == kept) & (entry.at == visual.numpy()) & call.static[kept]
            if entry.relevance is not None and s.relevant_share > 0 and len(reusable):
                top = max(1, round(s.relevant_share * len(reusable)))
                reusable[torch.topk(entry.relevance, min(top, len(reusable))).indices.cpu().numpy()] = False
            # Only a partial schedule needs to know which static tokens are the most static.
            order = (
                np.argsort(-patch_similarity(entry.patches[kept], call.patches[kept]), kind="stable")
                if entry.layer_ratios is not None
                else np.arange(len(kept))
            )
            computed = _computed_positions(prepared.length, visual, reusable, order, n_layers, s.start_layer,
                                           entry.layer_ratios)  # fmt: skip
            # The text after the images (the event's context line, the question) may differ in
            # length: those positions are computed anyway; only the visual ones are reused.
            previous = (_fitted(entry.keys, prepared.length), _fitted(entry.values, prepared.length))
            result = run_prefill(model, embeds, prepared.position_ids, prepared.image_mask, prefix=prefix,
                                 computed=computed, previous=previous, relevance_layer=mid,
                                 deepstack=deepstack)  # fmt: skip
            ratios = entry.layer_ratios
            # Tokens recomputed now take the current patch as their reference.
            reference = entry.patches.copy()
            recomputed = kept[~reusable]
            reference[recomputed] = call.patches[recomputed]
            outcome = ReuseOutcome("reuse", len(visual), int(call.static[kept].sum()), int(reusable.sum()),
                                     len(call.tile_pixels), call.tiles_reused, result.computed_share)  # fmt: skip
        before = prefix[0][0].shape[2] if prefix is not None else 0
        own = [k[:, :, before:].clone() for k in result.keys] if before else result.keys
        own_values = [v[:, :, before:].clone() for v in result.values] if before else result.values
        stored = _Entry(
            call.event_id, call.input_ids, reference, own, own_values, result.relevance, call.tile_pixels,
            call.tile_features, call.tile_states, ratios, entry.calls + 1 if entry is not None else 1,
            kept=kept, at=visual.numpy(), prefix=call.prefix,
        )  # fmt: skip
        stored.nbytes = _held_bytes(stored)
        outcome.evicted = self._store(call.key, stored)
        call.outcome = self.last = outcome
        return result

    def _store(self, key: tuple[str, str], entry: _Entry) -> int:
        """Keep ``entry`` as the most recently used, evicting past the bounds; how many
        entries that evicted (``entry`` itself, when it alone is over ``max_mib``)."""
        s = self.settings
        limit = int(s.max_mib * 2**20)
        before = sum(self.evictions.values())
        if entry.nbytes > limit:
            self.evictions["bytes"] += 1
            return 1
        mine = [k for k in self._entries if k[0] == key[0]]  # least recently used first
        while len(mine) >= s.max_entries_per_source:
            victim = next((k for k in mine if self._entries[k].calls == 1), mine[0])
            mine.remove(victim)
            self._evict(victim, "source")
        self._entries[key] = entry
        while len(self._entries) > s.max_entries:
            self._evict(next(iter(self._entries)), "entries")
        while self.nbytes > limit:
            self._evict(next(iter(self._entries)), "bytes")
        self.size = (self.entries, self.nbytes)
        return sum(self.evictions.values()) - before

    def _evict(self, key: tuple[str, str], bound: str) -> None:
        del self._entries[key]
        self.evictions[bound] += 1


def _head(prepared: Prepared) -> torch.Tensor:
    """The prompt's token ids up to its last visual token: what the visual tokens' K/V
    depend on (attention is causal; the text after them may change from call to call)."""
    visual = torch.nonzero(prepared.image_mask.cpu()).flatten()
    upto = int(visual.max()) + 1 if len(visual) else 0
    return prepared.input_ids[:, :upto].cpu()


def _fitted(tensors: list[torch.Tensor], length: int) -> list[torch.Tensor]:
    """Per layer K or V cut or padded (with zeros, never read: computed there) to ``length`` positions."""
    out = []
    for t in tensors:
        if t.shape[2] >= length:
            out.append(t[:, :, :length])
        else:
            pad = t.new_zeros((*t.shape[:2], length - t.shape[2], t.shape[3]))
            out.append(torch.cat((t, pad), dim=2))
    return out


def _held_bytes(entry: _Entry) -> int:
    """Bytes of the tensors and arrays ``entry`` holds, each storage counted once, whole (a
    tile's pixels are a view that keeps the request's whole pixel tensor alive)."""
    tensors = [entry.input_ids, *entry.keys, *entry.values, *entry.tile_pixels]
    tensors += [t for features in entry.tile_features for t in (features.tokens, *features.deepstack)]
    tensors += [t for state in entry.tile_states if state is not None for t in (*state[0], *state[1], state[2])]
    if entry.relevance is not None:
        tensors.append(entry.relevance)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) + entry.patches.nbytes


def _full_reason(
    entry: _Entry | None, head: torch.Tensor, event_id: str, patches: npt.NDArray[np.uint8], prefix: str
) -> str:
    if entry is None:
        return "first call"
    if entry.event_id != event_id:
        return "new episode"
    if entry.prefix != prefix:
        return "memory changed"
    if not torch.equal(entry.input_ids, head) or entry.patches.shape != patches.shape:
        return "images or layout changed"
    return ""


def _computed_positions(
    length: int,
    visual: torch.Tensor,
    reusable: npt.NDArray[np.bool_],
    order: npt.NDArray[np.intp],
    n_layers: int,
    start_layer: int,
    ratios: list[float] | None,
) -> list[torch.Tensor]:
    """Positions computed at each layer; reused ones drop out from ``start_layer`` on (all
    of them, or for the entropy schedule a growing share, most similar first)."""
    everything = torch.arange(length)
    candidates = [i for i in order if reusable[i]]  # most static first
    by_count: dict[int, torch.Tensor] = {0: everything}  # one tensor per distinct number dropped
    computed = []
    for layer in range(n_layers):
        count = 0 if layer < start_layer else round((1.0 if ratios is None else ratios[layer]) * len(candidates))
        if count not in by_count:
            keep = torch.ones(length, dtype=torch.bool)
            keep[visual[torch.tensor(candidates[:count], dtype=torch.long)]] = False
            by_count[count] = everything[keep]
        computed.append(by_count[count])
    return computed


def _entropy_schedule(entropy: list[float], start_layer: int) -> list[float]:
    """VLA-Cache's per-layer reuse ratios: 1 - min-max-normalised attention entropy from
    ``start_layer`` on, each increase damped, never decreasing (so a token reused at one
    layer stays reused at every later one)."""
    values = np.array(entropy[start_layer:], dtype=np.float64)
    span = values.max() - values.min() if len(values) else 0.0
    target = 1 - (values - values.min()) / span if span > 0 else np.ones_like(values)
    ratios = [0.0] * start_layer
    current = float(target[0]) if len(target) else 1.0
    for value in target:
        current = current + ENTROPY_DAMPING * max(0.0, float(value) - current)
        ratios.append(current)
    return ratios

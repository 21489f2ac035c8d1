"""Tile reuse, step 3 of temporal token reuse (:mod:`stream_rt.mllm.techniques.token_reuse`):
the vision encoder runs only on the pieces of a request that changed. A piece (a tile of
an image, or a whole image: what the family's encoder sees on its own) is reused whole
when its pixels are the same, bit for bit, as a piece of the cached call's, in its slot
or another (``tiles="exact"``), or — with ``tiles="static"`` — when all its tokens are
static. With ``encoder_partial``, on a family whose encoder pass stream_rt runs itself
(SigLIP, :class:`~stream_rt.mllm.models.adapters.SiglipLayers`), a piece with some
changed tokens recomputes only the patches under them from ``start_layer`` on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stream_rt.mllm.models.families import Family, Prepared, TileState, VisualFeatures

if TYPE_CHECKING:
    from stream_rt.config import TokenReuseConfig
    from stream_rt.mllm.techniques.token_reuse import ReuseCall


@dataclass
class TileEncoding:
    """A request's visual features (``None``: no images) and, per piece when it was
    encoded piece by piece, its pixels, features and encoder state."""

    features: VisualFeatures | None
    reused: int = 0  # pieces reused whole
    pixels: list[torch.Tensor] = field(default_factory=list)
    tile_features: list[VisualFeatures] = field(default_factory=list)
    states: list[TileState | None] = field(default_factory=list)


def encode_tiles(model: Any, family: Family, prepared: Prepared, call: ReuseCall, s: TokenReuseConfig) -> TileEncoding:
    """The visual features of ``call``'s request; per tile: reused whole when unchanged,
    re-encoded only where its tokens changed (``encoder_partial``), or encoded afresh."""
    if not prepared.vision:
        return TileEncoding(None)
    n_tiles = family.tiles(prepared) if s.tiles != "off" else 0
    if not n_tiles:
        return TileEncoding(family.encode(model, prepared))
    entry, static, why, grids = call.entry, call.static, call.why, call.grids
    pixels = [family.tile_pixels(prepared, t) for t in range(n_tiles)]
    starts = np.cumsum([0, *(g.size for g in grids)])
    features: list[VisualFeatures] = []
    states: list[TileState | None] = []
    reused = 0
    comparable = entry is not None and len(entry.tile_pixels) == n_tiles
    partial = s.encoder_partial and family.partial_encoder
    for t in range(n_tiles):
        tile_static = static[starts[t] : starts[t + 1]]
        previous = entry.tile_pixels if entry is not None else None
        same = _same_tile(previous, t, pixels[t], comparable)  # the same pixels, in this slot or another
        if same is not None or (comparable and s.tiles == "static" and not why and bool(tile_static.all())):
            assert entry is not None
            j = t if same is None else same
            features.append(entry.tile_features[j])
            states.append(entry.tile_states[j])
            pixels[t] = entry.tile_pixels[j]  # the reference stays what the features came from
            reused += 1
            continue
        if partial and comparable and entry is not None and not why and entry.tile_states[t] is not None:
            changed = torch.from_numpy(~tile_static)
            tokens, state = family.encode_tile_reusing(model, prepared, t, changed, entry.tile_states[t],
                                                       s.start_layer)  # fmt: skip
            features.append(VisualFeatures(tokens))
            states.append(state)
        elif partial:
            tokens, state = family.encode_tile_reusing(model, prepared, t, None, None, s.start_layer)
            features.append(VisualFeatures(tokens))
            states.append(state)
        else:
            features.append(family.encode_tile(model, prepared, t))
            states.append(None)
    return TileEncoding(joined(features), reused, pixels, features, states)


def joined(pieces: list[VisualFeatures]) -> VisualFeatures:
    """The features of consecutive pieces of a request, as one."""
    layers = len(pieces[0].deepstack)
    return VisualFeatures(torch.cat([p.tokens for p in pieces]),
                          tuple(torch.cat([p.deepstack[k] for p in pieces]) for k in range(layers)))  # fmt: skip


def _same_tile(previous: list[torch.Tensor] | None, t: int, pixels: torch.Tensor, comparable: bool) -> int | None:
    """The previous call's tile with exactly ``pixels`` — tile ``t`` first, then any other
    (a frame a clip shares with the one before moves one slot along): its index, or ``None``."""
    if previous is None:
        return None
    sample = pixels[..., ::32, ::32]  # most tiles differ here already: a full compare only for those that do not

    def same(old: torch.Tensor) -> bool:
        return old.shape == pixels.shape and torch.equal(old[..., ::32, ::32], sample) and torch.equal(old, pixels)

    if comparable and same(previous[t]):
        return t
    return next((j for j, old in enumerate(previous) if same(old)), None)

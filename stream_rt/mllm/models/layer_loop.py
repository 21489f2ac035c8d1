"""The language model's decoder layers, run by one loop that every technique plugs into.

:func:`run_prefill` runs the decoder layers itself (the same operations as the layers
transformers ships: RMSNorm, rotary attention with grouped K/V heads and q/k norms where
the model has them, MLP) for a prompt, or for one decoded token. Where a family's layers
differ from Llama's, the loop consults the family's :class:`~stream_rt.mllm.models.families.Layout`
(:meth:`Family.layout`): sliding-window layers (a position sees itself and the
``window - 1`` positions before it, counted in the sequence, the prefix included), a
rotary module per layer kind (Gemma 3's local and global bases), Gemma's sandwich norms,
and a prompt's visual tokens attending to every token of their own image (Gemma 3). What
the techniques need:

- ``prefix`` (optional): K/V of the positions before these — the streaming memory's
  prefix before a prompt, or everything so far before a decoded token. Every computed
  position attends to all of it (within its layer's window); the K/V returned include
  it, so they are the cache for what comes next.
- ``computed[l]`` (optional, temporal token reuse): the positions computed at layer
  ``l``. A position left out keeps ``previous``'s K/V in that layer — it is no longer a
  query, but every computed position still attends to it. Sets must shrink with depth (a
  position reused at one layer is reused at every later one), as in VLA-Cache.
- ``deepstack`` (Qwen3-VL's DeepStack): after layer ``i`` (for each of the first
  ``len(deepstack)`` layers), ``deepstack[i]`` — one row per visual token — is added to
  the hidden states of the visual tokens still computed. A token reused from a layer on
  needs no more of it: its hidden state is not carried past that layer, and its K/V there
  are the previous call's, made from its previous additions.
- ``relevance_layer``: at that layer the attention weights of the question's tokens (the
  positions after the last visual token) onto the visual tokens are computed explicitly,
  head-averaged and summed, for the next call's relevance filter.
- ``exit`` (decoding one token, :mod:`stream_rt.mllm.techniques.layer_exit`): the intermediate
  exits are evaluated and, once one is taken, the remaining layers only get K/V for the
  position, from the exit's hidden state.

With every position computed and no exit it is the model's own forward pass (tested
against it for every adapter family).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from stream_rt.mllm.models.families import Layout, layout_of

if TYPE_CHECKING:
    from stream_rt.mllm.techniques.layer_exit import LayerExit

KV = tuple[list[torch.Tensor], list[torch.Tensor]]
"""Per layer: keys (1, kv_heads, positions, head_dim), rotary applied, and values."""


@dataclass
class PrefillResult:
    logits: torch.Tensor  # (1, vocab): the last position's
    keys: list[torch.Tensor]  # per layer (1, kv_heads, prefix + L, head_dim), rotary applied
    values: list[torch.Tensor]
    relevance: torch.Tensor | None  # (visual tokens,) attention the question paid to each
    computed_share: float  # of position-layers actually computed
    entropy: list[float] | None = None  # per layer: mean entropy of the question's attention


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` (1, heads, n, head_dim) with cos/sin (1, n, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def project(
    layer: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, queries: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """A decoder layer's queries (unless ``queries`` is false) and keys, rotary applied, and
    values for ``hidden`` (1, n, hidden size): (1, heads, n, head_dim) each."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (1, hidden.shape[1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape) if queries else None
    k = attn.k_proj(x).view(shape)
    if hasattr(attn, "k_norm"):
        q = attn.q_norm(q) if q is not None else None
        k = attn.k_norm(k)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    return (rotary(q.transpose(1, 2), cos, sin) if q is not None else None), rotary(k.transpose(1, 2), cos, sin), v


def layer_rotary(model: Any, x: torch.Tensor, position_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, the rotary (cos, sin) of ``position_ids`` (one pair per layer
    kind, shared by the layers of that kind)."""
    decoder = model.get_decoder()
    kinds = layout_of(model).rotary_kinds
    if not kinds:
        return [decoder.rotary_emb(x, position_ids)] * len(decoder.layers)
    by_kind = {kind: decoder.rotary_emb(x, position_ids, kind) for kind in set(kinds)}
    return [by_kind[kind] for kind in kinds]


def run_prefill(
    model: Any,
    embeds: torch.Tensor,
    position_ids: torch.Tensor | None,
    image_mask: torch.Tensor | None = None,
    *,
    prefix: KV | None = None,
    computed: list[torch.Tensor] | None = None,
    previous: KV | None = None,
    relevance_layer: int | None = None,
    entropy: bool = False,
    exit: LayerExit | None = None,
    deepstack: Sequence[torch.Tensor] = (),
) -> PrefillResult:
    """Run ``embeds`` (1, L, hidden) through the decoder layers (see the module's text)."""
    decoder = model.get_decoder()
    layers = decoder.layers
    layout = layout_of(model)
    length = embeds.shape[1]
    device = embeds.device
    before = prefix[0][0].shape[2] if prefix is not None else 0
    if position_ids is None:
        position_ids = torch.arange(before, before + length, device=device)[None]
    position_ids = position_ids.to(device)
    rotary = layer_rotary(model, embeds, position_ids)
    visual = torch.nonzero(image_mask.to(device)).flatten() if image_mask is not None else torch.arange(0)
    question = torch.arange(int(visual.max()) + 1 if len(visual) else 0, length, device=device)
    everything = torch.arange(length, device=device)
    rows = everything  # positions whose hidden state is carried
    hidden = embeds
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    relevance = None
    entropies: list[float] | None = [] if entropy else None
    done = 0
    images = image_mask if layout.images_attend_within and length > 1 else None
    # Who each position may attend to, per distinct window (None: everything; CAUSAL: the plain causal square).
    masks = {w: _allowed(length, before, w, images, device) for w in set(layout.windows)}
    exits = set(exit.exit_layers(len(layers))) if exit is not None else set()
    last_probs: torch.Tensor | None = None
    distances: list[float] = []
    tops: list[int] = []
    logits: torch.Tensor | None = None
    depth = len(layers)
    for index, layer in enumerate(layers):
        cos, sin = rotary[index]
        if logits is not None:  # exited: this layer only gets K/V, from the exit's hidden state
            _, k, v = project(layer, hidden, cos[:, rows], sin[:, rows], queries=False)
            keys.append(_joined(prefix, 0, index, k))
            values.append(_joined(prefix, 1, index, v))
            continue
        wanted = computed[index].to(device) if computed is not None else everything
        if len(wanted) != len(rows):
            # Shrink to the positions still computed (a subset of the current rows).
            keep = torch.isin(rows, wanted)
            hidden, rows = hidden[:, keep], rows[keep]
            masks = {w: _materialised(m, length, before, device)[keep] if m is not None else None
                     for w, m in masks.items()}  # fmt: skip
        done += len(rows)
        attn = layer.self_attn
        q, k, v = project(layer, hidden, cos[:, rows], sin[:, rows])
        assert q is not None
        if len(rows) != length:
            assert previous is not None, "reusing positions needs the previous call's K/V"
            k_all, v_all = previous[0][index].clone(), previous[1][index].clone()
            k_all[:, :, rows] = k
            v_all[:, :, rows] = v
            k, v = k_all, v_all
        k_full, v_full = _joined(prefix, 0, index, k), _joined(prefix, 1, index, v)
        keys.append(k_full)
        values.append(v_full)
        groups = attn.num_key_value_groups
        allowed = masks[layout.windows[index]]
        if (index == relevance_layer or entropies is not None) and len(visual) and len(question):
            at = torch.isin(rows, question)
            k_rep = k_full.repeat_interleave(groups, dim=1) if groups > 1 else k_full
            scores = (q[:, :, at] @ k_rep.transpose(-1, -2)) * attn.scaling
            if allowed is not None:
                scores = scores.masked_fill(~_materialised(allowed, length, before, device)[at], float("-inf"))
            weights = scores.softmax(dim=-1)  # (1, heads, queries, L)
            if index == relevance_layer:
                relevance = weights[..., before + visual].mean(dim=1).sum(dim=(0, 1)).float()
            if entropies is not None:
                entropies.append(float(-(weights * weights.clamp_min(1e-12).log()).sum(-1).mean()))
        out = attention(q, k_full, v_full, allowed, groups, attn.scaling)
        out = attn.o_proj(out.transpose(1, 2).reshape(1, len(rows), -1))
        hidden = _rest_of_layer(layer, layout, hidden, out)
        if index < len(deepstack) and len(visual):
            hidden = _added_to_visual(hidden, rows, visual, deepstack[index])
        if index + 1 in exits and index + 1 < len(layers):
            assert exit is not None
            exit_logits = model.lm_head(decoder.norm(hidden[:, -1])).float()
            probs = exit_logits.softmax(-1)
            tops.append(int(probs.argmax()))
            if last_probs is not None:
                distances.append(float(torch.linalg.vector_norm(probs - last_probs)))
                if tops[-1] == tops[-2] and distances[-1] < exit.threshold(len(distances) - 1):
                    logits, depth = exit_logits, index + 1
            last_probs = probs
    if logits is None:
        logits = model.lm_head(decoder.norm(hidden[:, -1])).float()
        tops.append(int(logits.argmax()))
    if exit is not None:
        exit.record(depth, distances, tops)
    return PrefillResult(logits, keys, values, relevance, done / (length * len(layers)), entropies)


def _rest_of_layer(layer: Any, layout: Layout, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The layer's output from its input ``hidden`` and its attention's output ``attended``:
    the residual adds and the MLP, with Gemma's sandwich norms where the layout has them."""
    if layout.sandwich:
        hidden = hidden + layer.post_attention_layernorm(attended)
        return hidden + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
    hidden = hidden + attended
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _added_to_visual(
    hidden: torch.Tensor, rows: torch.Tensor, visual: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """``hidden`` (1, rows, hidden size) with ``features`` (one row per visual token, in
    the order of ``visual``, the sorted positions of the visual tokens) added to the rows
    that are visual tokens."""
    carried = torch.isin(rows, visual)
    if not bool(carried.any()):
        return hidden
    which = torch.searchsorted(visual, rows[carried])
    hidden = hidden.clone()
    hidden[0, carried] += features.to(hidden.device, hidden.dtype)[which]
    return hidden


CAUSAL = "causal"
"""A mask that is plain causal attention after whatever came before (no window that bites,
no images): SDPA's lower-right causal bias, which needs no mask tensor."""

Mask = torch.Tensor | str | int | None
"""Who the positions attend to: ``None`` everything, :data:`CAUSAL`, an int ``n`` the last
``n`` keys (a decoded token in a sliding-window layer), or a bool tensor."""


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Mask, groups: int,
              scale: float) -> torch.Tensor:  # fmt: skip
    """Scaled dot-product attention of ``q`` over ``k`` / ``v`` (``groups`` query heads per
    K/V head) where ``allowed``: without a mask tensor (everything, or causal after the
    prefix) SDPA takes the grouped heads as they are and its causal kernels, as
    transformers does; with one, the K/V heads are repeated for it."""
    if isinstance(allowed, int):  # the window's keys only: everything in them is visible
        k, v = k[:, :, -allowed:], v[:, :, -allowed:]
        allowed = None
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=groups > 1)
    if allowed is CAUSAL:
        bias = causal_lower_right(q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=groups > 1)
    assert isinstance(allowed, torch.Tensor)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[None, None], scale=scale)


def _materialised(allowed: Mask, length: int, before: int, device: torch.device) -> torch.Tensor:
    """``allowed`` as a (length, before + length) bool tensor, where it is :data:`CAUSAL`."""
    keys = torch.arange(before + length, device=device)
    if allowed is CAUSAL:
        return keys[None, :] <= before + torch.arange(length, device=device)[:, None]
    if isinstance(allowed, int):
        return (keys >= before + length - allowed)[None, :].expand(length, -1)
    assert isinstance(allowed, torch.Tensor)
    return allowed


def _allowed(length: int, before: int, window: int | None, images: torch.Tensor | None, device: torch.device) -> Mask:
    """Which positions each of these ``length`` positions (after ``before`` of a prefix)
    attends to — the causal ones, within ``window`` positions of it if given, and with
    ``images`` (bool per position: a visual token) every token of its own image, a run of
    visual tokens, as Gemma 3 does (its token-type mask: within a window, only ever widened
    to the image's later tokens). As a :data:`Mask`: ``None`` (all), :data:`CAUSAL`, the
    last ``window`` keys (a decoded token), or a (length, before + length) bool tensor."""
    if length == 1:  # one position (a decoded token) sees everything, or its window's last keys
        return None if window is None or before < window else window
    if images is None and (window is None or window >= before + length):
        return CAUSAL
    queries = before + torch.arange(length, device=device)
    keys = torch.arange(before + length, device=device)
    allowed = keys[None, :] <= queries[:, None]
    if images is not None:
        images = images.to(device)
        starts = images & ~torch.cat((images.new_zeros(1), images[:-1]))
        image_of = torch.where(images, torch.cumsum(starts.long(), 0), -1)  # -1: text
        allowed[:, before:] |= (image_of[:, None] == image_of[None, :]) & (image_of[:, None] >= 0)
    if window is not None:
        allowed &= keys[None, :] > queries[:, None] - window
    return allowed


def _joined(prefix: KV | None, which: int, layer: int, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (this call's K or V in ``layer``) after the prefix's, if any."""
    return tensor if prefix is None else torch.cat((prefix[which][layer], tensor), dim=2)

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
from typing import Any, Protocol

import torch

from stream_rt.mllm.models.adapters import layout_of
from stream_rt.mllm.models.attention import attention, mask_for, materialised
from stream_rt.mllm.models.families import Layout
from stream_rt.mllm.models.layer_loop import KV, LayerStack, run_layers


class ExitRule(Protocol):
    """When decoding may leave the layer stack early (the layer exit technique,
    :class:`stream_rt.mllm.techniques.layer_exit.LayerExit`, implements it)."""

    def exit_layers(self, n_layers: int) -> list[int]: ...
    def threshold(self, k: int) -> float: ...
    def record(self, depth: int, distances: list[float], tops: list[int]) -> None: ...


@dataclass
class PrefillResult:
    logits: torch.Tensor  # (1, vocab): the last position's
    keys: list[torch.Tensor]  # per layer (1, kv_heads, prefix + L, head_dim), rotary applied
    values: list[torch.Tensor]
    relevance: torch.Tensor | None  # (visual tokens,) attention the question paid to each
    computed_share: float  # of position-layers actually computed
    entropy: list[float] | None = None  # per layer: mean entropy of the question's attention
    depth: int = 0  # layers run for the last position (fewer than all where the layer exit left early)


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
    exit: ExitRule | None = None,
    deepstack: Sequence[torch.Tensor] = (),
) -> PrefillResult:
    """Run ``embeds`` (1, L, hidden) through the decoder layers (see the module's text)."""
    plugged = Plugins(relevance_layer, [] if entropy else None, exit, deepstack)
    decoder = DecoderLayers(model, embeds, position_ids, image_mask, prefix, plugged)
    run = run_layers(decoder, embeds, computed, previous)
    layers = decoder.layers
    for index in range(len(run.keys), len(layers)):  # exited: these layers only get K/V, from the exit's hidden state
        cos, sin = decoder.rotary[index]
        _, k, v = project(layers[index], run.hidden, cos[:, run.rows], sin[:, run.rows], queries=False)
        run.keys.append(_joined(prefix, 0, index, k))
        run.values.append(_joined(prefix, 1, index, v))
    logits = decoder.exit_logits
    if logits is None:
        logits = model.lm_head(model.get_decoder().norm(run.hidden[:, -1])).float()
        decoder.tops.append(int(logits.argmax()))
    if exit is not None:
        exit.record(decoder.depth, decoder.distances, decoder.tops)
    share = run.computed / (decoder.length * len(layers))
    return PrefillResult(logits, run.keys, run.values, decoder.relevance, share, plugged.entropies, decoder.depth)


@dataclass
class Plugins:
    """What the techniques plug into the decoder's layer loop (see the module's text)."""

    relevance_layer: int | None
    entropies: list[float] | None  # filled per layer, when asked for
    exit: ExitRule | None
    deepstack: Sequence[torch.Tensor]


class DecoderLayers(LayerStack):
    """The language model's decoder layers for one run: rotary positions per layer kind,
    the prefix's K/V before these positions, the attention masks of the family's
    :class:`Layout`, and what :class:`Plugins` asks for."""

    def __init__(self, model: Any, embeds: torch.Tensor, position_ids: torch.Tensor | None,
                 image_mask: torch.Tensor | None, prefix: KV | None, plugged: Plugins) -> None:  # fmt: skip
        self.model, self.prefix, self.plugged = model, prefix, plugged
        self.layers = model.get_decoder().layers
        self.layout = layout_of(model)
        self.length = length = embeds.shape[1]
        self.device = device = embeds.device
        self.before = before = prefix[0][0].shape[2] if prefix is not None else 0
        if position_ids is None:
            position_ids = torch.arange(before, before + length, device=device)[None]
        self.rotary = layer_rotary(model, embeds, position_ids.to(device))
        visual = torch.nonzero(image_mask.to(device)).flatten() if image_mask is not None else torch.arange(0)
        self.visual = visual
        self.question = torch.arange(int(visual.max()) + 1 if len(visual) else 0, length, device=device)
        images = image_mask if self.layout.images_attend_within and length > 1 else None
        # Who each position may attend to, per distinct window (None: everything; CAUSAL: the plain causal square).
        self.masks = {w: mask_for(length, before, w, images, device) for w in set(self.layout.windows)}
        exit = plugged.exit
        self.exits = set(exit.exit_layers(len(self.layers))) if exit is not None else set()
        self.relevance: torch.Tensor | None = None
        self.exit_logits: torch.Tensor | None = None  # the exit's, once one is taken
        self.depth = len(self.layers)
        self.last_probs: torch.Tensor | None = None
        self.distances: list[float] = []
        self.tops: list[int] = []

    def project(self, index: int, layer: Any, hidden: torch.Tensor,
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        cos, sin = self.rotary[index]
        q, k, v = project(layer, hidden, cos[:, rows], sin[:, rows])
        assert q is not None
        return q, k, v

    def joined(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _joined(self.prefix, 0, index, k), _joined(self.prefix, 1, index, v)

    def shrunk(self, keep: torch.Tensor) -> None:
        self.masks = {w: materialised(m, self.length, self.before, self.device)[keep] if m is not None else None
                      for w, m in self.masks.items()}  # fmt: skip

    def forward(self, index: int, layer: Any, hidden: torch.Tensor, rows: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # fmt: skip
        attn, plugged = layer.self_attn, self.plugged
        groups = attn.num_key_value_groups
        allowed = self.masks[self.layout.windows[index]]
        entropies = plugged.entropies
        if (index == plugged.relevance_layer or entropies is not None) and len(self.visual) and len(self.question):
            at = torch.isin(rows, self.question)
            k_rep = k.repeat_interleave(groups, dim=1) if groups > 1 else k
            scores = (q[:, :, at] @ k_rep.transpose(-1, -2)) * attn.scaling
            if allowed is not None:
                scores = scores.masked_fill(~materialised(allowed, self.length, self.before, self.device)[at],
                                            float("-inf"))  # fmt: skip
            weights = scores.softmax(dim=-1)  # (1, heads, queries, L)
            if index == plugged.relevance_layer:
                self.relevance = weights[..., self.before + self.visual].mean(dim=1).sum(dim=(0, 1)).float()
            if entropies is not None:
                entropies.append(float(-(weights * weights.clamp_min(1e-12).log()).sum(-1).mean()))
        out = attention(q, k, v, allowed, groups, attn.scaling)
        out = attn.o_proj(out.transpose(1, 2).reshape(1, len(rows), -1))
        hidden = _rest_of_layer(layer, self.layout, hidden, out)
        if index < len(plugged.deepstack) and len(self.visual):
            hidden = _added_to_visual(hidden, rows, self.visual, plugged.deepstack[index])
        return hidden

    def exits_after(self, index: int, hidden: torch.Tensor) -> bool:
        exit = self.plugged.exit
        if index + 1 not in self.exits or index + 1 >= len(self.layers):
            return False
        assert exit is not None
        decoder = self.model.get_decoder()
        exit_logits = self.model.lm_head(decoder.norm(hidden[:, -1])).float()
        probs = exit_logits.softmax(-1)
        self.tops.append(int(probs.argmax()))
        taken = False
        if self.last_probs is not None:
            self.distances.append(float(torch.linalg.vector_norm(probs - self.last_probs)))
            if self.tops[-1] == self.tops[-2] and self.distances[-1] < exit.threshold(len(self.distances) - 1):
                self.exit_logits, self.depth, taken = exit_logits, index + 1, True
        self.last_probs = probs
        return taken


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


def _joined(prefix: KV | None, which: int, layer: int, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (this call's K or V in ``layer``) after the prefix's, if any."""
    return tensor if prefix is None else torch.cat((prefix[which][layer], tensor), dim=2)

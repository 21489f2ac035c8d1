"""The language model's decoder layers, run by one loop that every technique plugs into.

:func:`run_prefill` runs the decoder layers itself (the same operations as the Llama /
Qwen2 layers transformers ships: RMSNorm, rotary attention with grouped K/V heads, MLP)
for a prompt, or for one decoded token, with what the techniques need:

- ``prefix`` (optional): K/V of the positions before these — the streaming memory's
  prefix before a prompt, or everything so far before a decoded token. Every computed
  position attends to all of it; the K/V returned include it, so they are the cache for
  what comes next.
- ``computed[l]`` (optional, temporal token reuse): the positions computed at layer
  ``l``. A position left out keeps ``previous``'s K/V in that layer — it is no longer a
  query, but every computed position still attends to it. Sets must shrink with depth (a
  position reused at one layer is reused at every later one), as in VLA-Cache.
- ``relevance_layer``: at that layer the attention weights of the question's tokens (the
  positions after the last visual token) onto the visual tokens are computed explicitly,
  head-averaged and summed, for the next call's relevance filter.
- ``exit`` (decoding one token, :mod:`stream_rt.mllm.layer_exit`): the intermediate
  exits are evaluated and, once one is taken, the remaining layers only get K/V for the
  position, from the exit's hidden state.

With every position computed and no exit it is the model's own forward pass (tested
against it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from stream_rt.mllm.layer_exit import LayerExit

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
) -> PrefillResult:
    """Run ``embeds`` (1, L, hidden) through the decoder layers (see the module's text)."""
    decoder = model.get_decoder()
    layers = decoder.layers
    length = embeds.shape[1]
    device = embeds.device
    before = prefix[0][0].shape[2] if prefix is not None else 0
    if position_ids is None:
        position_ids = torch.arange(before, before + length, device=device)[None]
    position_ids = position_ids.to(device)
    cos_all, sin_all = decoder.rotary_emb(embeds, position_ids)
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
    allowed: torch.Tensor | None = None  # one position (a decoded token) sees everything: no mask
    if length > 1:
        causal = everything[None, :] <= rows[:, None]  # by position, among these
        allowed = torch.cat((causal.new_ones(length, before), causal), dim=1) if before else causal
    exits = set(exit.exit_layers(len(layers))) if exit is not None else set()
    last_probs: torch.Tensor | None = None
    distances: list[float] = []
    tops: list[int] = []
    logits: torch.Tensor | None = None
    depth = len(layers)
    for index, layer in enumerate(layers):
        if logits is not None:  # exited: this layer only gets K/V, from the exit's hidden state
            _, k, v = project(layer, hidden, cos_all[:, rows], sin_all[:, rows], queries=False)
            keys.append(_joined(prefix, 0, index, k))
            values.append(_joined(prefix, 1, index, v))
            continue
        wanted = computed[index].to(device) if computed is not None else everything
        if len(wanted) != len(rows):
            # Shrink to the positions still computed (a subset of the current rows).
            keep = torch.isin(rows, wanted)
            assert allowed is not None
            hidden, rows, allowed = hidden[:, keep], rows[keep], allowed[keep]
        done += len(rows)
        attn = layer.self_attn
        q, k, v = project(layer, hidden, cos_all[:, rows], sin_all[:, rows])
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
        k_rep = k_full.repeat_interleave(groups, dim=1) if groups > 1 else k_full
        v_rep = v_full.repeat_interleave(groups, dim=1) if groups > 1 else v_full
        if (index == relevance_layer or entropies is not None) and len(visual) and len(question):
            at = torch.isin(rows, question)
            scores = (q[:, :, at] @ k_rep.transpose(-1, -2)) * attn.scaling
            scores = scores if allowed is None else scores.masked_fill(~allowed[at], float("-inf"))
            weights = scores.softmax(dim=-1)  # (1, heads, queries, L)
            if index == relevance_layer:
                relevance = weights[..., before + visual].mean(dim=1).sum(dim=(0, 1)).float()
            if entropies is not None:
                entropies.append(float(-(weights * weights.clamp_min(1e-12).log()).sum(-1).mean()))
        mask = None if allowed is None else allowed[None, None]
        out = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask, scale=attn.scaling)
        out = attn.o_proj(out.transpose(1, 2).reshape(1, len(rows), -1))
        hidden = hidden + out
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
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


def _joined(prefix: KV | None, which: int, layer: int, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (this call's K or V in ``layer``) after the prefix's, if any."""
    return tensor if prefix is None else torch.cat((prefix[which][layer], tensor), dim=2)

"""Prefill layer by layer, so that some positions can stop being computed.

:func:`run_prefill` runs the language model's decoder layers itself (the same operations
as the Llama / Qwen2 layers transformers ships: RMSNorm, rotary attention with grouped
K/V heads, MLP) with two additions that temporal token reuse needs:

- ``computed[l]`` (optional): the positions computed at layer ``l``. A position left out
  keeps ``previous``'s K/V in that layer — it is no longer a query, but every computed
  position still attends to it. Sets must shrink with depth (a position reused at one
  layer is reused at every later one), as in VLA-Cache.
- ``relevance_layer``: at that layer the attention weights of the question's tokens (the
  positions after the last visual token) onto the visual tokens are computed explicitly,
  head-averaged and summed, for the next call's relevance filter.

With every position computed it is the model's own forward pass (tested against it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class PrefillResult:
    logits: torch.Tensor  # (1, vocab): the last position's
    keys: list[torch.Tensor]  # per layer (1, kv_heads, L, head_dim), rotary applied
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
    image_mask: torch.Tensor,
    *,
    computed: list[torch.Tensor] | None = None,
    previous: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    relevance_layer: int | None = None,
    entropy: bool = False,
) -> PrefillResult:
    decoder = model.get_decoder()
    layers = decoder.layers
    length = embeds.shape[1]
    device = embeds.device
    if position_ids is None:
        position_ids = torch.arange(length, device=device)[None]
    cos_all, sin_all = decoder.rotary_emb(embeds, position_ids)
    visual = torch.nonzero(image_mask.to(device)).flatten()
    question = torch.arange(int(visual.max()) + 1 if len(visual) else 0, length, device=device)
    everything = torch.arange(length, device=device)
    rows = everything  # positions whose hidden state is carried
    hidden = embeds
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    relevance = None
    entropies: list[float] | None = [] if entropy else None
    done = 0
    allowed = everything[None, :] <= rows[:, None]  # causal, by position
    for index, layer in enumerate(layers):
        wanted = computed[index].to(device) if computed is not None else everything
        if len(wanted) != len(rows):
            # Shrink to the positions still computed (a subset of the current rows).
            keep = torch.isin(rows, wanted)
            hidden, rows, allowed = hidden[:, keep], rows[keep], allowed[keep]
        done += len(rows)
        attn = layer.self_attn
        q, k, v = project(layer, hidden, cos_all[:, rows], sin_all[:, rows])
        assert q is not None
        if len(rows) == length:
            k_full, v_full = k, v
        else:
            assert previous is not None, "reusing positions needs the previous call's K/V"
            k_full, v_full = previous[0][index].clone(), previous[1][index].clone()
            k_full[:, :, rows] = k
            v_full[:, :, rows] = v
        keys.append(k_full)
        values.append(v_full)
        groups = attn.num_key_value_groups
        k_rep = k_full.repeat_interleave(groups, dim=1) if groups > 1 else k_full
        v_rep = v_full.repeat_interleave(groups, dim=1) if groups > 1 else v_full
        if (index == relevance_layer or entropies is not None) and len(visual) and len(question):
            at = torch.isin(rows, question)
            scores = (q[:, :, at] @ k_rep.transpose(-1, -2)) * attn.scaling
            weights = scores.masked_fill(~allowed[at], float("-inf")).softmax(dim=-1)  # (1, heads, queries, L)
            if index == relevance_layer:
                relevance = weights[..., visual].mean(dim=1).sum(dim=(0, 1)).float()
            if entropies is not None:
                entropies.append(float(-(weights * weights.clamp_min(1e-12).log()).sum(-1).mean()))
        out = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=allowed[None, None], scale=attn.scaling)
        out = attn.o_proj(out.transpose(1, 2).reshape(1, len(rows), -1))
        hidden = hidden + out
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    logits = model.lm_head(decoder.norm(hidden[:, -1])).float()
    return PrefillResult(logits, keys, values, relevance, done / (length * len(layers)), entropies)

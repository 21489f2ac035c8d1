"""Who each position attends to in the layer loop (:mod:`stream_rt.mllm.models.layer_loop`),
and the attention over it: causal, within a sliding window, both ways among one image's
tokens (Gemma 3), as SDPA takes it with as few mask tensors as it can."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

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


def materialised(allowed: Mask, length: int, before: int, device: torch.device) -> torch.Tensor:
    """``allowed`` as a (length, before + length) bool tensor, where it is :data:`CAUSAL`."""
    keys = torch.arange(before + length, device=device)
    if allowed is CAUSAL:
        return keys[None, :] <= before + torch.arange(length, device=device)[:, None]
    if isinstance(allowed, int):
        return (keys >= before + length - allowed)[None, :].expand(length, -1)
    assert isinstance(allowed, torch.Tensor)
    return allowed


def mask_for(length: int, before: int, window: int | None, images: torch.Tensor | None, device: torch.device) -> Mask:
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

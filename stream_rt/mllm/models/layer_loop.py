"""The one layer loop: a stack of transformer layers run position by position set, where
a technique may leave positions out of a layer. The language model's decoder
(:class:`~stream_rt.mllm.models.decoder.DecoderLayers`: prefill, memory prefix, token reuse,
decoding with the layer exit) and the SigLIP vision encoder of encoder reuse
(:class:`~stream_rt.mllm.models.adapters.SiglipLayers`) are its two stacks; each says
how its layers project and attend (:class:`LayerStack`), the loop does the rest: which
positions are carried, and the K/V splice that keeps a left-out position's keys and
values from the previous call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

KV = tuple[list[torch.Tensor], list[torch.Tensor]]
"""Per layer: keys (1, kv_heads, positions, head_dim), rotary applied, and values."""


class LayerStack:
    """A stack of transformer layers as :func:`run_layers` runs them: how a layer projects
    a position's query, key and value, and what it makes of the attention over them. The
    hooks a stack may leave as they are: :meth:`joined` (K/V that came before these
    positions), :meth:`shrunk` (fewer positions carried on) and :meth:`exits_after` (stop
    before the next layer)."""

    layers: Sequence[Any]

    def project(self, index: int, layer: Any, hidden: torch.Tensor,
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Queries, keys and values (1, heads, len(rows), head_dim) of ``hidden``, the
        positions ``rows``."""
        raise NotImplementedError

    def joined(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values every computed position attends to in layer ``index``."""
        return k, v

    def shrunk(self, keep: torch.Tensor) -> None:
        """The carried positions were cut to ``keep`` (bool per position carried so far)."""

    def forward(self, index: int, layer: Any, hidden: torch.Tensor, rows: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The layer's output for ``hidden`` (the positions ``rows``), from its queries ``q``
        and every position's keys ``k`` and values ``v``."""
        raise NotImplementedError

    def exits_after(self, index: int, hidden: torch.Tensor) -> bool:
        """Whether to stop after layer ``index`` (the layer exit)."""
        return False


@dataclass
class LayersRun:
    hidden: torch.Tensor  # (1, len(rows), hidden size): the last layer run's output
    rows: torch.Tensor  # the positions still carried at the end
    keys: list[torch.Tensor]  # per layer run: every position's (joined), previous ones kept
    values: list[torch.Tensor]
    computed: int  # position-layers actually computed


def run_layers(stack: LayerStack, hidden: torch.Tensor, computed: Sequence[torch.Tensor] | None = None,
               previous: KV | None = None) -> LayersRun:  # fmt: skip
    """Run ``hidden`` (1, L, hidden size) through ``stack``'s layers. ``computed[l]``: the
    positions computed at layer ``l`` (sets shrink with depth); a position left out keeps
    ``previous``' K/V in that layer and every later one, and stays a key every computed
    position attends to. Stops early where the stack :meth:`~LayerStack.exits_after`."""
    length = hidden.shape[1]
    everything = torch.arange(length, device=hidden.device)
    rows = everything  # positions whose hidden state is carried
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    done = 0
    for index, layer in enumerate(stack.layers):
        wanted = computed[index].to(hidden.device) if computed is not None else everything
        if len(wanted) != len(rows):
            # Shrink to the positions still computed (a subset of the current rows).
            keep = torch.isin(rows, wanted)
            hidden, rows = hidden[:, keep], rows[keep]
            stack.shrunk(keep)
        done += len(rows)
        q, k, v = stack.project(index, layer, hidden, rows)
        if len(rows) != length:
            assert previous is not None, "reusing positions needs the previous call's K/V"
            k_all, v_all = previous[0][index].clone(), previous[1][index].clone()
            k_all[:, :, rows] = k
            v_all[:, :, rows] = v
            k, v = k_all, v_all
        k, v = stack.joined(index, k, v)
        keys.append(k)
        values.append(v)
        hidden = stack.forward(index, layer, hidden, rows, q, k, v)
        if stack.exits_after(index, hidden):
            break
    return LayersRun(hidden, rows, keys, values, done)

"""Intermediate-layer exit for decoding (DeeR's criterion, applied to tokens).

Every ``every`` layers the hidden state of the token being decoded is projected through
the final norm and the LM head; once two successive exits agree — the same top token, and
token distributions closer than that exit's threshold (L2 distance between probability
vectors) — the token is taken from the exit and the remaining layers are skipped. The skipped layers still get
K/V for this position (computed from the exit's hidden state, CALM's state propagation),
so later tokens attend to a complete cache. The exits are evaluated inside the one layer
loop every call runs (:func:`stream_rt.mllm.models.decoder.run_prefill`).

Thresholds are calibrated on logged calls (:func:`calibrate`): run with thresholds
``None`` (every exit is measured, none taken) to log distances, then choose thresholds so
that the share of tokens leaving at exit k follows p_k ∝ λ^k, with λ set for the target
average depth (DeeR). With every threshold 0 no exit is ever taken and the output is the
full model's.

What it keeps stays bounded however long it decodes: how many tokens ran each number of
layers (:attr:`LayerExit.depth_counts`, one count per depth), and — only on a measuring
run — the distances and top tokens of the last ``log_limit`` tokens.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

MAX_DISTANCE = 2.0
"""Above any L2 distance between two probability vectors (at most sqrt(2))."""


@dataclass
class LayerExit:
    every: int = 2
    thresholds: list[float] | None = None  # one per exit after the first; None: measure only
    log_limit: int = 10_000  # measuring runs: tokens whose distances and top tokens are kept (the latest)
    depth_counts: Counter[int] = field(default_factory=Counter)  # layers run -> decoded tokens that ran them
    distances: deque[list[float]] = field(init=False)  # measuring: per token, per exit after the first
    tokens: deque[list[int]] = field(init=False)  # measuring: per token, top token at each exit, then the final

    def __post_init__(self) -> None:
        self.distances = deque(maxlen=self.log_limit)
        self.tokens = deque(maxlen=self.log_limit)

    def exit_layers(self, n_layers: int) -> list[int]:
        """Layer counts after which an exit is evaluated (the last layer is not an exit;
        with ``thresholds`` empty, none: an exit that can never be taken costs nothing)."""
        if self.thresholds is not None and not any(t > 0 for t in self.thresholds):
            return []
        return list(range(self.every, n_layers, self.every))

    def threshold(self, k: int) -> float:
        if self.thresholds is None or k >= len(self.thresholds):
            return -1.0  # never exits
        return self.thresholds[k]

    def record(self, depth: int, distances: list[float], tops: list[int]) -> None:
        """One decoded token: it ran ``depth`` layers; a measuring run also logs its exits'
        ``distances`` and top tokens ``tops``."""
        self.depth_counts[depth] += 1
        if self.thresholds is None:
            self.distances.append(distances)
            self.tokens.append(tops)

    @property
    def decoded(self) -> int:
        """Tokens decoded with the exits."""
        return sum(self.depth_counts.values())

    @property
    def layers_run(self) -> int:
        """Layers run over all of them."""
        return sum(depth * n for depth, n in self.depth_counts.items())

    @property
    def mean_depth(self) -> float:
        """Mean layers run per decoded token (0 before the first)."""
        return self.layers_run / self.decoded if self.depth_counts else 0.0


def exit_cost(model: Any) -> float:
    """What evaluating one exit costs a decoded token, in decoder layers: the output layer's
    weights over a layer's (decoding one token reads every weight it uses once, so its time
    follows the weights). Large vocabularies make an exit cost several layers."""
    layers = model.get_decoder().layers
    per_layer = sum(p.numel() for p in layers[0].parameters())
    return float(model.lm_head.weight.numel()) / max(1, per_layer)


def calibrate(log: LayerExit, n_layers: int, target_depth: float, cost: float = 0.0) -> list[float]:
    """Thresholds (one per exit after the first) for an average depth near ``target_depth``
    layers, on the distances a measuring run (thresholds ``None``) logged. An exit whose top
    token differs from the previous exit's can never be taken, whatever its distance. With
    ``cost`` (:func:`exit_cost`), exits that would cost the logged tokens more — layers run
    plus exits evaluated — than running every layer give none (``[]``: no exit evaluated)."""
    exit_layers = log.exit_layers(n_layers)
    n_exits = len(exit_layers) - 1
    if n_exits <= 0:  # one exit has nothing to agree with
        return []
    table = _exit_table(log, n_layers)
    if len(table) == 0:
        return []
    depths = [*exit_layers[1:], n_layers]

    def thresholds_for(lam: float) -> tuple[list[float], float]:
        shares = lam ** np.arange(n_exits + 1, dtype=np.float64)
        shares /= shares.sum()
        remaining = np.ones(len(table), dtype=bool)
        thresholds, depth_sum = [], 0.0
        for k in range(n_exits):
            want = round(shares[k] * len(table))
            candidates = np.sort(table[remaining, k])
            t = float(np.nextafter(candidates[want - 1], np.inf)) if 0 < want <= len(candidates) else 0.0
            t = min(t, MAX_DISTANCE)  # an exit whose top token changed stays closed
            leaving = remaining & (table[:, k] < t)
            depth_sum += depths[k] * leaving.sum()
            remaining &= ~leaving
            thresholds.append(t)
        depth_sum += n_layers * remaining.sum()
        return thresholds, depth_sum / len(table)

    low, high = 1e-3, 1e3  # small lambda: most tokens leave early
    for _ in range(40):
        mid = float(np.sqrt(low * high))
        _, depth = thresholds_for(mid)
        low, high = (mid, high) if depth < target_depth else (low, mid)
    thresholds = thresholds_for(float(np.sqrt(low * high)))[0]
    if cost > 0 and _mean_cost(table, thresholds, depths, n_layers, cost) >= n_layers:
        return []  # on this log, evaluating the exits costs more than the layers they skip
    return thresholds


def _mean_cost(table: npt.NDArray[np.float64], thresholds: list[float], depths: list[int], n_layers: int,
               cost: float) -> float:  # fmt: skip
    """Mean layers' worth of work per logged token with ``thresholds``: the layers it runs
    and ``cost`` for each exit evaluated on the way."""
    total = 0.0
    for row in table:
        k = next((k for k, d in enumerate(row) if d < thresholds[k]), None)
        total += n_layers + (len(depths)) * cost if k is None else depths[k] + (k + 2) * cost
    return total / len(table)


def _exit_table(log: LayerExit, n_layers: int) -> npt.NDArray[np.float64]:
    """Per logged token, per exit after the first: the distance, or inf where the top
    token changed (that exit cannot be taken)."""
    n_exits = len(log.exit_layers(n_layers)) - 1
    rows = []
    for distances, tops in zip(log.distances, log.tokens, strict=True):
        if len(distances) == n_exits:
            rows.append([d if tops[k + 1] == tops[k] else np.inf for k, d in enumerate(distances)])
    return np.array(rows, dtype=np.float64).reshape(-1, max(n_exits, 0))


def simulated_agreement(log: LayerExit, n_layers: int, thresholds: list[float]) -> tuple[float, float]:
    """On a measuring run's log: (mean depth, share of tokens whose exit's top token equals
    the full-depth one) had these thresholds been used — each token judged on the
    full-depth prefix (teacher-forced), so one early difference does not spoil the rest."""
    depths = [*log.exit_layers(n_layers)[1:], n_layers]
    table = _exit_table(log, n_layers)
    tokens = [t for d, t in zip(log.distances, log.tokens, strict=True) if len(d) == len(depths) - 1]
    chosen_depths, agree = [], 0
    for row, tops in zip(table, tokens, strict=True):
        k = next((k for k, d in enumerate(row) if k < len(thresholds) and d < thresholds[k]), None)
        chosen_depths.append(n_layers if k is None else depths[k])
        agree += (tops[-1] if k is None else tops[k + 1]) == tops[-1]
    return float(np.mean(chosen_depths)), agree / max(1, len(tokens))

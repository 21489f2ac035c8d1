"""A latency histogram in Prometheus' shape: cumulative counts per upper bound, a sum and a
count. Nodes keep them (:meth:`~stream_rt.graph.node.Node.histograms`); ``/metrics``
exports them."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Upper bounds for latencies from a fast model call to a slow one (seconds)."""


@dataclass
class Histogram:
    help: str  # what it measures, for ``/metrics``
    bounds: tuple[float, ...] = SECONDS
    counts: list[int] = field(default_factory=list)  # per bucket, the last one past every bound
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def to_record(self) -> dict[str, object]:
        """Plain data (for ``Graph.statistics()``, which goes out as JSON): the help, the
        upper bounds, the cumulative counts (the last for +inf), the sum and the count."""
        return {"help": self.help, "bounds": list(self.bounds), "cumulative": [n for _, n in self.cumulative()],
                "sum": self.total, "count": self.count}  # fmt: skip

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at most it)``, ending with ``(inf, count)``."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

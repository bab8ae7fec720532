"""A small histogram of counts by bucket (batch sizes, queue depths), exported to Prometheus by the API.

Kept here, beside the engine's scheduler that fills one, so the pipeline's stages use the same class.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
"""Upper bounds of a batch size histogram's buckets (rows per forward call)."""
QUEUE_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)
"""Upper bounds of a queue depth histogram's buckets (work waiting when a step began)."""


@dataclass
class Histogram:
    """Counts of observed values by bucket upper bound (cumulative on export, as Prometheus wants)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # one per bound, plus one for the values above them all
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, values at or below it)`` pairs, ending with ``inf``."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((float(bound), running))
        return out

    def labelled(self, label: Callable[[float], str]) -> list[tuple[str, int]]:
        """:meth:`cumulative` with each bound written by ``label`` (the last as ``+Inf``)."""
        return [("+Inf" if math.isinf(b) else label(b), n) for b, n in self.cumulative()]

    def largest(self) -> float:
        """The bound of the highest bucket that holds a value (0 when empty; +inf past every bound)."""
        filled = [i for i, n in enumerate(self.counts) if n]
        if not filled:
            return 0
        return self.bounds[filled[-1]] if filled[-1] < len(self.bounds) else float("inf")

    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

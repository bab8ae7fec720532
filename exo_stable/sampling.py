"""Token sampling: greedy, or seeded temperature / top-k / top-p.

Seeded sampling is a pure function of (logits, parameters, seed, position): each position draws from its
own generator seeded with ``(seed, position)``. Any node, and any replay after a failure, therefore draws
the same token for the same logits, with no generator state to carry around.
"""

from __future__ import annotations

import msgspec
import numpy as np
import numpy.typing as npt


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How the next token is chosen. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError("temperature must be between 0 and 10")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def sample(logits: npt.NDArray[np.float32], params: SamplingParams, position: int) -> int:
    """Pick the token at ``position`` from one row of logits."""
    if params.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < scaled.shape[0]:
        candidates = np.argpartition(-scaled, params.top_k - 1)[: params.top_k]
    else:
        candidates = np.arange(scaled.shape[0])
    # Stable order (by logit, then id) so the cumulative sums below are reproducible everywhere.
    order = np.lexsort((candidates, -scaled[candidates]))
    candidates = candidates[order]
    values = scaled[candidates]
    probs = np.exp(values - values[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        cumulative = np.cumsum(probs)
        keep = int(np.searchsorted(cumulative, params.top_p, side="left")) + 1
        candidates, probs = candidates[:keep], probs[:keep]
        probs = probs / probs.sum()
    rng = np.random.default_rng([params.seed & 0xFFFFFFFFFFFFFFFF, position])
    draw = rng.random()
    index = int(np.searchsorted(np.cumsum(probs), draw, side="right"))
    return int(candidates[min(index, len(candidates) - 1)])

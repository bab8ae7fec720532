"""Token sampling: greedy, or seeded; logit bias and repetition penalties; log-probabilities.

Seeded sampling is a pure function of (logits, parameters, seed, position, tokens so far): each position
draws from its own generator seeded with ``(seed, position)``, and the penalties are computed afresh from
the tokens before the position. Any node, and any replay after a failure, therefore picks the same token
for the same logits, with no generator or penalty state to carry around.

The order is llama.cpp's sampler chain (and mlx-lm's): a grammar's mask, logit bias, then the penalties
(repetition, then frequency and presence) over the last :data:`PENALTY_WINDOW` tokens of prompt and
completion, then top-k, top-p and min-p on the (unscaled) distribution, then the temperature, then the
seeded draw. Greedy is the argmax after mask, bias and penalties. Log-probabilities are the model's own
(log-softmax of the raw logits), as vLLM reports them by default: what the model thought, whatever the
sampler then did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import numpy.typing as npt

PENALTY_WINDOW = 64
"""Tokens the penalties look back over (prompt and completion together): llama.cpp's ``penalty_last_n``."""

MAX_TOP_LOGPROBS = 20


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How the next token is chosen. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    prompt_tail: tuple[int, ...] = ()
    """The prompt's last :data:`PENALTY_WINDOW` tokens (only when a penalty is on): they count as seen."""
    logprobs: int | None = None
    """Report the picked token's log-probability and this many of the most likely ones (None: report none)."""
    grammar: str = ""
    """A grammar the completion must follow (llguidance's form; see ``grammar.py``), or empty."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError("temperature must be between 0 and 10")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0 or not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError("repetition_penalty must be in (0, 10]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy on the raw logits with nothing to report: the argmax can run on the device, ahead."""
        return self.greedy and not self.penalized and not self.logit_bias and self.logprobs is None and not self.grammar

    @property
    def needs_history(self) -> bool:
        """Whether picking a token depends on the completion's tokens before it (penalties, a grammar)."""
        return self.penalized or bool(self.grammar)


@dataclass(frozen=True, slots=True)
class Pick:
    """A picked token, with its log-probability and the most likely alternatives when they were asked for."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def process(
    logits: npt.NDArray[np.floating],
    params: SamplingParams,
    previous: Sequence[int],
    allowed: npt.NDArray[np.bool_] | None = None,
) -> np.ndarray:
    """The grammar's mask, logit bias, then penalties (float64 copy); ``previous``: the completion's tokens
    before this position; ``allowed``: the tokens the grammar allows there (None: no grammar)."""
    out = logits.astype(np.float64)
    if allowed is not None:
        if not allowed.any():
            raise ValueError("the grammar allows no token here")
        out[~allowed] = -np.inf
    for token, bias in params.logit_bias:
        if 0 <= token < out.shape[0]:
            out[token] += bias
    if params.penalized:
        window = [*params.prompt_tail, *previous][-PENALTY_WINDOW:]
        if window:
            ids, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
            keep = ids < out.shape[0]
            ids, counts = ids[keep], counts[keep]
            seen = out[ids]
            if params.repetition_penalty != 1.0:
                seen = np.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
            seen = seen - counts * params.frequency_penalty - params.presence_penalty
            out[ids] = seen
    return out


def sample(
    logits: npt.NDArray[np.floating],
    params: SamplingParams,
    position: int,
    previous: Sequence[int] = (),
    allowed: npt.NDArray[np.bool_] | None = None,
) -> int:
    """Pick the token at ``position`` from one row of logits."""
    processed = params.logit_bias or params.penalized or allowed is not None
    values = process(logits, params, previous, allowed) if processed else None
    if params.greedy:
        return int(np.argmax(logits if values is None else values))
    scaled = logits.astype(np.float64) if values is None else values
    if params.top_k and params.top_k < scaled.shape[0]:
        candidates = np.argpartition(-scaled, params.top_k - 1)[: params.top_k]
    else:
        candidates = np.arange(scaled.shape[0])
    # Stable order (by logit, then id) so the cumulative sums below are reproducible everywhere.
    order = np.lexsort((candidates, -scaled[candidates]))
    candidates = candidates[order]
    kept = scaled[candidates]
    if params.top_p < 1.0:
        probs = np.exp(kept - kept[0])
        cumulative = np.cumsum(probs / probs.sum())
        keep = int(np.searchsorted(cumulative, params.top_p, side="left")) + 1
        candidates, kept = candidates[:keep], kept[:keep]
    if params.min_p > 0.0:
        keep = max(1, int(np.count_nonzero(kept >= kept[0] + np.log(params.min_p))))
        candidates, kept = candidates[:keep], kept[:keep]
    with np.errstate(over="ignore", under="ignore"):  # a tiny temperature sends the rest to exp(-inf) = 0
        probs = np.exp((kept - kept[0]) / params.temperature)
    probs /= probs.sum()
    rng = np.random.default_rng([params.seed & 0xFFFFFFFFFFFFFFFF, position])
    draw = rng.random()
    index = int(np.searchsorted(np.cumsum(probs), draw, side="right"))
    return int(candidates[min(index, len(candidates) - 1)])


def log_softmax(logits: npt.NDArray[np.floating]) -> np.ndarray:
    x = logits.astype(np.float64)
    top = float(np.max(x))
    return x - top - float(np.log(np.sum(np.exp(x - top))))


def pick(
    logits: npt.NDArray[np.floating],
    params: SamplingParams,
    position: int,
    previous: Sequence[int] = (),
    allowed: npt.NDArray[np.bool_] | None = None,
) -> Pick:
    """:func:`sample`, with the log-probabilities the request asked for."""
    token = sample(logits, params, position, previous, allowed)
    if params.logprobs is None:
        return Pick(token)
    logprobs = log_softmax(logits)
    top: tuple[tuple[int, float], ...] = ()
    n = min(params.logprobs, logprobs.shape[0])
    if n:
        best = np.argpartition(-logprobs, n - 1)[:n]
        best = best[np.lexsort((best, -logprobs[best]))]
        top = tuple((int(i), float(logprobs[i])) for i in best)
    return Pick(token, float(logprobs[token]), top)

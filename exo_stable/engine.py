"""The single-device engine: the whole model on one dedicated MLX thread, one KV cache per request.

Generation is a plain async iterator of token ids; it knows nothing of text, stop strings or HTTP. The
request's owner reads as many tokens as it wants and closes the iterator, which frees the cache. Every
step is a job on the MLX thread with a deadline, so requests interleave step by step.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import numpy as np

from exo_stable.loader import ModelSource
from exo_stable.mlx_thread import MlxThread
from exo_stable.model import LayerRange
from exo_stable.modelspec import Dtype
from exo_stable.sampling import SamplingParams
from exo_stable.stagecompute import StageCompute

log = logging.getLogger(__name__)


class ContextOverflow(ValueError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""


@dataclass
class EngineStats:
    requests_started: int = 0
    requests_active: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class SingleDeviceEngine:
    """Holds one model on one MLX thread and runs any number of requests through it."""

    def __init__(
        self,
        source: ModelSource,
        *,
        dtype: Dtype,
        max_requests: int = 16,
        step_timeout_s: float = 120.0,
        load_timeout_s: float = 600.0,
    ) -> None:
        self.source = source
        self.dtype = dtype
        self.max_requests = max_requests
        self.step_timeout_s = step_timeout_s
        self.load_timeout_s = load_timeout_s
        self.stats = EngineStats()
        n = source.spec.num_hidden_layers
        self._compute = StageCompute(source, LayerRange(0, n, n), dtype, max_requests=max_requests)
        self._thread = MlxThread(f"mlx-{source.name}")
        self._ids = itertools.count()

    async def start(self) -> None:
        seconds = await self._thread.run(self._compute.load, timeout=self.load_timeout_s)
        log.info("loaded %s (%s) in %.2fs", self.source.name, self.dtype, seconds)

    def close(self) -> None:
        self._thread.close()

    @property
    def context_length(self) -> int:
        return self.source.spec.context_length

    @property
    def open_requests(self) -> int:
        return len(self._compute.requests)

    def check_fits(self, prompt_len: int) -> None:
        if prompt_len == 0:
            raise ContextOverflow("the prompt is empty")
        if prompt_len >= self.context_length:
            raise ContextOverflow(
                f"the prompt has {prompt_len} tokens; this model's context is {self.context_length} tokens"
            )

    def _prefill(self, rid: str, prompt: Sequence[int], params: SamplingParams) -> int:
        self._compute.open(rid, params)
        t0 = time.perf_counter()
        token = self._compute.prefill_local(rid, prompt)
        self.stats.prefill_seconds += time.perf_counter() - t0
        self.stats.prompt_tokens += len(prompt)
        return token

    def _decode(self, rid: str, token: int, position: int) -> int:
        t0 = time.perf_counter()
        nxt = self._compute.decode_local(rid, token, position)
        self.stats.decode_seconds += time.perf_counter() - t0
        return nxt

    async def generate(self, prompt: Sequence[int], params: SamplingParams, max_tokens: int) -> AsyncGenerator[int]:
        """Yield up to ``max_tokens`` token ids (never past the context). Closing the iterator frees the cache."""
        self.check_fits(len(prompt))
        budget = min(max_tokens, self.context_length - len(prompt))
        rid = f"r{next(self._ids)}"
        self.stats.requests_started += 1
        self.stats.requests_active += 1
        try:
            token = await self._thread.run(self._prefill, rid, list(prompt), params, timeout=self.step_timeout_s)
            for position in range(1, budget + 1):
                self.stats.generated_tokens += 1
                yield token
                if position == budget:
                    break
                token = await self._thread.run(self._decode, rid, token, position, timeout=self.step_timeout_s)
        finally:
            self.stats.requests_active -= 1
            if self._thread.alive:
                self._thread.submit(self._compute.close, rid, timeout=self.step_timeout_s)

    async def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of ``ids`` in one forward pass (teacher forcing, tests)."""
        return await self._thread.run(self._compute.logits_all, list(ids), timeout=self.step_timeout_s)

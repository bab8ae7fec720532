"""The single-device engine: the whole model on one dedicated MLX thread, one KV cache per request.

Generation is a plain async iterator of token ids; it knows nothing of text, stop strings or HTTP. The
request's owner reads as many tokens as it wants and closes the iterator, which frees the cache. Every
step is a job on the MLX thread with a deadline, so requests interleave step by step.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from exo_stable.engine.batching import BatchMode
from exo_stable.engine.device import DeviceKind, activate, chosen, describe
from exo_stable.engine.loader import ModelSource
from exo_stable.engine.mlx_thread import MlxThread
from exo_stable.engine.model import LayerRange
from exo_stable.engine.modelspec import Dtype
from exo_stable.engine.sampling import Pick, SamplingParams
from exo_stable.engine.scheduler import BatchScheduler, BatchStats
from exo_stable.engine.slicing import PREFILL_SHARE
from exo_stable.engine.stagecompute import ComputeStats, StageCompute, prefill_chunk

log = logging.getLogger(__name__)


class ContextOverflow(ValueError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""


@dataclass
class EngineStats:
    requests_started: int = 0
    requests_active: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0  # requests stepped one at a time (batching off); a batching engine's
    decode_seconds: float = 0.0  # scheduler keeps its own (BatchScheduler.prefill_seconds, decode_seconds)


@dataclass
class _Ahead:
    """A greedy request's queued steps: tokens still computing, oldest first, and how many were queued."""

    tokens: deque[mx.array]
    queued: int


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
        lookahead: bool = True,
        lookahead_depth: int | None = None,
        device: DeviceKind | None = None,
        batch: BatchMode = BatchMode.EXACT,
        batch_limit: int = 16,
        step_tokens: int | None = None,
        prefill_share: float | None = PREFILL_SHARE,
    ) -> None:
        self.source = source
        self.dtype = dtype
        self.max_requests = max_requests
        self.step_timeout_s = step_timeout_s
        self.load_timeout_s = load_timeout_s
        self.lookahead = lookahead
        self.device = device if device is not None else chosen()
        # Steps queued ahead of the token being read. One already hides the host's turn: on an H200, two
        # measured the same (182.0 against 181.3 tok/s, benchmarks/results/gpu.json) and are kept there as
        # slack; on a CPU, whose cores also do the host's turn, a second queued step only competes with it.
        self.lookahead_depth = lookahead_depth or (2 if self.device is DeviceKind.GPU else 1)
        self.stats = EngineStats()
        # Greedy requests decoding ahead: their queued steps, still computing. MLX thread only.
        self._ahead: dict[str, _Ahead] = {}
        n = source.spec.num_hidden_layers
        self._compute = StageCompute(
            source, LayerRange(0, n, n), dtype, max_requests=max_requests, batch=batch, batch_limit=batch_limit
        )
        self._thread = MlxThread(f"mlx-{source.name}")
        # Tokens one step may forward: every decode row plus one prompt chunk (a chunk is never split).
        self.step_tokens = step_tokens if step_tokens is not None else prefill_chunk() + max_requests
        self.prefill_share = prefill_share  # see exo_stable.engine.slicing (None: prompt chunks go whole)
        self._scheduler: BatchScheduler | None = None
        self._ids = itertools.count()

    async def start(self) -> None:
        seconds = await self._thread.run(self._load, timeout=self.load_timeout_s)
        log.info(
            "loaded %s (%s, %s) in %.2fs; decode batch limit %d",
            self.source.name,
            self.dtype,
            describe(self.device),
            seconds,
            self.batch_limit,
        )
        if self.batch_limit > 1:
            self._scheduler = BatchScheduler(
                self._compute,
                self._thread,
                step_tokens=self.step_tokens,
                step_timeout_s=self.step_timeout_s,
                lookahead=self.lookahead,
                prefill_share=self.prefill_share,
            )

    @property
    def batch_limit(self) -> int:
        """Decode rows per forward call (1: requests step one at a time, as without batching)."""
        return self._compute.batch_limit

    @property
    def batch_stats(self) -> BatchStats | None:
        """The scheduler's step, batch size and queue depth figures (None when not batching)."""
        return None if self._scheduler is None else self._scheduler.stats

    @property
    def compute_stats(self) -> ComputeStats:
        """The forward calls' figures (steps queued ahead and undone among them)."""
        return self._compute.stats

    def _load(self) -> float:
        activate(self.device)
        return self._compute.load()

    def close(self) -> None:
        self._thread.close()

    @property
    def context_length(self) -> int:
        return self.source.spec.context_length

    @property
    def open_requests(self) -> int:
        return len(self._compute.requests)

    def kv_cache_bytes(self) -> int:
        """Bytes held by the open requests' KV caches (for /metrics; any thread)."""
        return self._compute.kv_cache_bytes()

    def check_fits(self, prompt_len: int) -> None:
        if prompt_len == 0:
            raise ContextOverflow("the prompt is empty")
        if prompt_len >= self.context_length:
            raise ContextOverflow(
                f"the prompt has {prompt_len} tokens; this model's context is {self.context_length} tokens"
            )

    def _prefill(self, rid: str, prompt: Sequence[int], params: SamplingParams) -> Pick:
        self._compute.open(rid, params)
        t0 = time.perf_counter()
        token = self._compute.prefill_pick(rid, prompt, 0)
        self.stats.prefill_seconds += time.perf_counter() - t0
        self.stats.prompt_tokens += len(prompt)
        return token

    def _decode(self, rid: str, token: int, position: int) -> Pick:
        t0 = time.perf_counter()
        nxt = self._compute.decode_pick(rid, token, position)
        self.stats.decode_seconds += time.perf_counter() - t0
        return nxt

    def _queue_ahead(self, rid: str, budget: int) -> None:
        """Queue greedy steps until ``lookahead_depth`` run ahead of the token being read (never past budget)."""
        pending = self._ahead[rid]
        while len(pending.tokens) <= self.lookahead_depth and pending.queued < budget:
            pending.tokens.append(self._compute.decode_ahead(rid, pending.tokens[-1]))
            pending.queued += 1

    def _prefill_ahead(self, rid: str, prompt: Sequence[int], params: SamplingParams, budget: int) -> int:
        """Greedy prefill; the next decode steps are queued before the token at position 0 is read."""
        self._compute.open(rid, params)
        t0 = time.perf_counter()
        self._ahead[rid] = _Ahead(deque([self._compute.prefill_ahead(rid, prompt)]), queued=1)
        self._queue_ahead(rid, budget)
        token = int(self._ahead[rid].tokens.popleft().item())  # type: ignore[arg-type]
        self.stats.prefill_seconds += time.perf_counter() - t0
        self.stats.prompt_tokens += len(prompt)
        return token

    def _decode_ahead(self, rid: str, position: int, budget: int) -> int:
        """The token at ``position`` (already computing); more steps are queued before it is read."""
        t0 = time.perf_counter()
        self._queue_ahead(rid, budget)
        token = int(self._ahead[rid].tokens.popleft().item())  # type: ignore[arg-type]
        self.stats.decode_seconds += time.perf_counter() - t0
        return token

    def _close(self, rid: str) -> None:
        self._ahead.pop(rid, None)
        self._compute.close(rid)

    async def generate(self, prompt: Sequence[int], params: SamplingParams, max_tokens: int) -> AsyncGenerator[int]:
        """Yield up to ``max_tokens`` token ids (never past the context). Closing the iterator frees the cache."""
        async with aclosing(self.picks(prompt, params, max_tokens)) as picks:
            async for picked in picks:
                yield picked.token

    async def picks(self, prompt: Sequence[int], params: SamplingParams, max_tokens: int) -> AsyncGenerator[Pick]:
        """:meth:`generate`, each token with the log-probabilities the request asked for."""
        self.check_fits(len(prompt))
        budget = min(max_tokens, self.context_length - len(prompt))
        rid = f"r{next(self._ids)}"
        self.stats.requests_started += 1
        self.stats.requests_active += 1
        if self._scheduler is not None:
            try:
                async with aclosing(self._scheduler.run(rid, list(prompt), params, budget)) as batched:
                    async for picked in batched:
                        self.stats.generated_tokens += 1
                        yield picked
            finally:
                self.stats.requests_active -= 1
                self.stats.prompt_tokens += len(prompt)
            return
        ahead = self.lookahead and params.plain_greedy
        try:
            if ahead:
                token = Pick(
                    await self._thread.run(
                        self._prefill_ahead, rid, list(prompt), params, budget, timeout=self.step_timeout_s
                    )
                )
            else:
                token = await self._thread.run(self._prefill, rid, list(prompt), params, timeout=self.step_timeout_s)
            for position in range(1, budget + 1):
                self.stats.generated_tokens += 1
                yield token
                if position == budget:
                    break
                if ahead:
                    token = Pick(
                        await self._thread.run(self._decode_ahead, rid, position, budget, timeout=self.step_timeout_s)
                    )
                else:
                    token = await self._thread.run(
                        self._decode, rid, token.token, position, timeout=self.step_timeout_s
                    )
        finally:
            self.stats.requests_active -= 1
            if self._thread.alive:
                self._thread.submit(self._close, rid, timeout=self.step_timeout_s)

    async def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of ``ids`` in one forward pass (teacher forcing, tests)."""
        return await self._thread.run(self._compute.logits_all, list(ids), timeout=self.step_timeout_s)

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
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from exo_stable.loader import ModelSource
from exo_stable.mlx_thread import MlxThread
from exo_stable.model import LayerRange, ShardModel
from exo_stable.modelspec import Dtype
from exo_stable.sampling import SamplingParams, sample

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512


class EngineBusy(RuntimeError):
    """Too many requests hold a KV cache already."""


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


@dataclass
class _Request:
    cache: list[KVCache]
    params: SamplingParams
    started: float = field(default_factory=time.perf_counter)


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
        self._thread = MlxThread(f"mlx-{source.name}")
        self._model: ShardModel | None = None
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()

    async def start(self) -> None:
        await self._thread.run(self._load, timeout=self.load_timeout_s)

    def close(self) -> None:
        self._thread.close()

    @property
    def context_length(self) -> int:
        return self.source.spec.context_length

    # --- the MLX thread -------------------------------------------------------------------------
    def _load(self) -> None:
        spec = self.source.spec
        started = time.perf_counter()
        self._model = self.source.load_shard(LayerRange(0, spec.num_hidden_layers, spec.num_hidden_layers), self.dtype)
        self.source.release_weights()
        log.info("loaded %s (%s) in %.2fs", self.source.name, self.dtype, time.perf_counter() - started)

    def _require_model(self) -> ShardModel:
        if self._model is None:
            raise RuntimeError("engine not started")
        return self._model

    def _forward_last(self, cache: list[KVCache], ids: Sequence[int]) -> mx.array:
        """Run ``ids`` through the model in fixed-size chunks; return the last position's logits."""
        model = self._require_model()
        logits: mx.array | None = None
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = mx.array([list(ids[start : start + PREFILL_CHUNK])], dtype=mx.int32)
            logits = model(chunk, cache)[:, -1, :]
            mx.eval(logits)
        assert logits is not None
        return logits[0]

    def _pick(self, logits: mx.array, params: SamplingParams, position: int) -> int:
        if params.greedy:
            return int(mx.argmax(logits).item())  # type: ignore[arg-type]
        row = np.array(logits.astype(mx.float32), copy=False)
        return sample(row, params, position)

    def _prefill(self, rid: str, prompt: Sequence[int], params: SamplingParams) -> int:
        if len(self._requests) >= self.max_requests:
            raise EngineBusy(f"{self.max_requests} requests already running")
        model = self._require_model()
        request = _Request(cache=model.make_cache(), params=params)
        self._requests[rid] = request
        t0 = time.perf_counter()
        token = self._pick(self._forward_last(request.cache, prompt), params, 0)
        self.stats.prefill_seconds += time.perf_counter() - t0
        self.stats.prompt_tokens += len(prompt)
        return token

    def _decode(self, rid: str, token: int, position: int) -> int:
        request = self._requests[rid]
        t0 = time.perf_counter()
        nxt = self._pick(self._forward_last(request.cache, [token]), request.params, position)
        self.stats.decode_seconds += time.perf_counter() - t0
        return nxt

    def _release(self, rid: str) -> None:
        self._requests.pop(rid, None)

    def _logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of ``ids`` in one forward pass (teacher forcing, tests)."""
        model = self._require_model()
        out = model(mx.array([list(ids)], dtype=mx.int32), model.make_cache())
        return np.array(out[0].astype(mx.float32))

    # --- the asyncio side -----------------------------------------------------------------------
    def check_fits(self, prompt_len: int) -> None:
        if prompt_len == 0:
            raise ContextOverflow("the prompt is empty")
        if prompt_len >= self.context_length:
            raise ContextOverflow(
                f"the prompt has {prompt_len} tokens; this model's context is {self.context_length} tokens"
            )

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
                self._thread.submit(self._release, rid, timeout=self.step_timeout_s)

    async def logits(self, ids: Sequence[int]) -> np.ndarray:
        return await self._thread.run(self._logits, list(ids), timeout=self.step_timeout_s)

"""What the HTTP API runs requests on: prompt ids in, text deltas and one finish reason out.

A :class:`Service` admits a bounded number of requests at once (a queue with a deadline beyond that) and
streams each one's deltas. Two kinds exist: :class:`InferenceService` on the single-device engine (the
terminal's ``generate`` and the fallback), and the cluster's service on the pipeline
(``exo_stable.node.cluster_service``). Whatever way a request ends (it finishes, the client goes away, an
error), closing its iterator frees its KV caches. Each delta carries its own counters; a consumer that wants
the totals folds them into a :class:`GenerationResult`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from exo_stable.engine.sampling import Pick, SamplingParams
from exo_stable.engine.scheduler import BatchStats
from exo_stable.engine.single import ContextOverflow, SingleDeviceEngine
from exo_stable.engine.textstream import Delta, TextStream
from exo_stable.pipeline.levels import ValidationLevel
from exo_stable.pipeline.recovery import ReplayMode
from exo_stable.pipeline.trace import RequestTrace, StepRecord
from exo_stable.tokenizer import Tokenizer


class ServiceBusy(RuntimeError):
    """No room for another request within the admission deadline."""


class ServiceOverloaded(RuntimeError):
    """Every slot is taken and the admission queue is full: the request is refused at once (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(RuntimeError):
    """The backend cannot run requests now (no pipeline yet), or a request's pipeline failed under it."""


@dataclass(frozen=True, slots=True)
class ServiceStatistics:
    """What any service knows of its requests (``Service.statistics()``: ``/health`` and ``/metrics``)."""

    model: str
    dtype: str
    active: int
    max_active: int
    queued: int
    refused_overloaded: int
    requests_started: int
    generated_tokens: int
    kv_cache_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """As ``/health`` shows it."""
        return {
            "status": "ok",
            "model": self.model,
            "dtype": self.dtype,
            "active_requests": self.active,
            "queued_requests": self.queued,
            "requests_started": self.requests_started,
            "generated_tokens": self.generated_tokens,
        }


@dataclass(frozen=True, slots=True)
class GenerationJob:
    prompt_ids: Sequence[int]
    params: SamplingParams
    max_tokens: int
    stop: Sequence[str] = ()
    replay: ReplayMode | None = None  # how a recovery rebuilds this request's caches (None: the node's default)
    validation: ValidationLevel | None = None  # the request's validation level (None: the node's default)


@dataclass
class GenerationResult:
    """What a consumer knows of a request once it has folded the request's deltas in with :meth:`add`.

    Deltas carry their own counters; this is their running sum, kept by whoever reads the stream (the API for
    usage and logprobs, tests and tools for the token ids). Nothing else writes it.
    """

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_s: float | None = None
    token_ids: list[int] = field(default_factory=list)
    picks: list[Pick] = field(default_factory=list)  # each token's log-probabilities, when the job asked for them

    def add(self, delta: Delta) -> Delta:
        """Fold in the next delta of the stream; returns it, so ``result.add(d)`` reads inside a loop."""
        self.token_ids.extend(delta.token_ids)
        self.picks.extend(delta.picks)
        self.completion_tokens = max(self.completion_tokens, delta.completion_tokens)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if self.first_token_s is None:
            self.first_token_s = delta.first_token_s
        return delta


def default_seed() -> int:
    return secrets.randbits(63)


class Service:
    """Bounded admission, model facts, and the ``stream`` every backend provides."""

    backend = "single_device"  # what runs the requests (in traces)

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        model_name: str,
        context_length: int,
        dtype: str,
        max_active: int = 8,
        admission_timeout_s: float = 30.0,
        max_queue: int = 32,
    ) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context_length = context_length
        self.dtype = dtype
        self.max_active = max_active
        self.admission_timeout_s = admission_timeout_s
        self._slots = asyncio.Semaphore(max_active)
        self.max_queue = max_queue
        self.queued = 0
        self.refused_overloaded = 0
        self.active = 0
        self.requests_started = 0
        self.generated_tokens = 0

    def check_fits(self, prompt_len: int) -> None:
        if prompt_len == 0:
            raise ContextOverflow("the prompt is empty")
        if prompt_len >= self.context_length:
            raise ContextOverflow(
                f"the prompt has {prompt_len} tokens; this model's context is {self.context_length} tokens"
            )

    def stream(self, job: GenerationJob, trace: RequestTrace | None = None) -> AsyncGenerator[Delta]:
        """The request's deltas (see :class:`Delta`), the last one carrying its finish reason; its steps and
        events go into ``trace`` when the caller keeps one. The caller must hold an admission slot."""
        raise NotImplementedError

    def unavailable(self) -> str | None:
        """Why requests cannot run right now, or None when they can."""
        return None

    def kv_cache_bytes(self) -> int | None:
        """Bytes this node's KV caches hold now (for /metrics), or None when unknown."""
        return None

    def batch_stats(self) -> BatchStats | None:
        """The decode batch sizes and prompt queue depths of this node's batching (for /metrics), or None."""
        return None

    def statistics(self) -> ServiceStatistics:
        return ServiceStatistics(
            model=self.model_name,
            dtype=self.dtype,
            active=self.active,
            max_active=self.max_active,
            queued=self.queued,
            refused_overloaded=self.refused_overloaded,
            requests_started=self.requests_started,
            generated_tokens=self.generated_tokens,
            kv_cache_bytes=self.kv_cache_bytes(),
        )

    def health(self) -> dict[str, Any]:
        return self.statistics().as_dict()

    async def admit(self) -> None:
        """Wait (with a deadline) for a free slot; pair with :meth:`release`.

        Raises ServiceOverloaded at once when every slot is taken and ``max_queue`` requests already wait,
        ServiceBusy when no slot frees within the admission deadline.
        """
        if self._slots.locked() and self.queued >= self.max_queue:
            self.refused_overloaded += 1
            raise ServiceOverloaded(
                f"{self.max_active} requests are running and {self.queued} are waiting (the queue holds"
                f" {self.max_queue}); retry later",
                retry_after_s=max(1, min(30, round(self.admission_timeout_s / 10))),
            )
        self.queued += 1
        try:
            async with asyncio.timeout(self.admission_timeout_s):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise ServiceBusy(
                f"{self.max_active} requests are running and none finished within {self.admission_timeout_s:.0f}s"
            ) from exc
        finally:
            self.queued -= 1
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._slots.release()


class InferenceService(Service):
    """Runs generation jobs on a single-device engine."""

    def __init__(self, engine: SingleDeviceEngine, *, max_active: int = 8, admission_timeout_s: float = 30.0) -> None:
        super().__init__(
            engine.source.tokenizer,
            model_name=engine.source.name,
            context_length=engine.context_length,
            dtype=str(engine.dtype),
            max_active=max_active,
            admission_timeout_s=admission_timeout_s,
        )
        self.engine = engine

    def kv_cache_bytes(self) -> int | None:
        return self.engine.kv_cache_bytes()

    def batch_stats(self) -> BatchStats | None:
        return self.engine.batch_stats

    async def stream(self, job: GenerationJob, trace: RequestTrace | None = None) -> AsyncGenerator[Delta]:
        """Yield deltas until one carries the finish reason. The caller must hold an admission slot."""
        self.requests_started += 1
        text = TextStream(self.tokenizer, stop=job.stop, max_tokens=job.max_tokens)
        started = last = time.perf_counter()
        first_token_s: float | None = None
        async with aclosing(self.engine.picks(job.prompt_ids, job.params, job.max_tokens)) as picks:
            async for picked in picks:
                now = time.perf_counter()
                if first_token_s is None:
                    first_token_s = now - started
                if trace is not None:
                    self._trace_step(trace, len(text.completion_ids), len(job.prompt_ids), now - last)
                last = now
                delta = text.push(picked.token, picked if picked.logprob is not None else None)
                self.generated_tokens += 1
                delta = delta.timed(first_token_s)
                if not delta.empty:
                    yield delta
                if delta.finish_reason is not None:
                    return
        # The engine stopped early only when the context is full.
        yield text.finish_length().timed(first_token_s)

    def _trace_step(self, trace: RequestTrace, position: int, prompt_tokens: int, seconds: float) -> None:
        """One step of the whole model: the prompt (position 0), then one token each; timed token to token."""
        n = self.engine.source.spec.num_hidden_layers
        trace.step(
            StepRecord(
                step=position,
                position=position,
                node_id="single-device",
                stage=0,
                layers=(0, n),
                tokens=prompt_tokens if position == 0 else 1,
                stage_s=seconds,
                bytes_out=0,
                checksum="",
                attempt=0,
                at_s=trace.now(),
            )
        )

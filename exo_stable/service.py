"""The request owner on one node: prompt ids in, text deltas and one finish reason out.

It admits a bounded number of requests at once (a queue with a deadline beyond that), runs each through
the engine, and applies stop rules through one TextStream per request. Whatever way a request ends (it
finishes, the client goes away, an error), closing its iterator frees the engine's KV cache.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from exo_stable.engine import SingleDeviceEngine
from exo_stable.sampling import SamplingParams
from exo_stable.textstream import Delta, TextStream


class ServiceBusy(RuntimeError):
    """No room for another request within the admission deadline."""


@dataclass(frozen=True, slots=True)
class GenerationJob:
    prompt_ids: Sequence[int]
    params: SamplingParams
    max_tokens: int
    stop: Sequence[str] = ()


@dataclass
class GenerationResult:
    """Filled in while a job streams; complete once its iterator ends."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_s: float | None = None


def default_seed() -> int:
    return secrets.randbits(63)


class InferenceService:
    """Runs generation jobs on a single-device engine with bounded admission."""

    def __init__(self, engine: SingleDeviceEngine, *, max_active: int = 8, admission_timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.tokenizer = engine.source.tokenizer
        self.max_active = max_active
        self.admission_timeout_s = admission_timeout_s
        self._slots = asyncio.Semaphore(max_active)
        self.active = 0

    async def admit(self) -> None:
        """Wait (with a deadline) for a free slot; pair with :meth:`release`."""
        try:
            async with asyncio.timeout(self.admission_timeout_s):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise ServiceBusy(
                f"{self.max_active} requests are running and none finished within {self.admission_timeout_s:.0f}s"
            ) from exc
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._slots.release()

    async def stream(self, job: GenerationJob, result: GenerationResult) -> AsyncGenerator[Delta]:
        """Yield deltas until one carries the finish reason. The caller must hold an admission slot."""
        text = TextStream(self.tokenizer, stop=job.stop, max_tokens=job.max_tokens)
        started = time.perf_counter()
        async with aclosing(self.engine.generate(job.prompt_ids, job.params, job.max_tokens)) as tokens:
            async for token in tokens:
                if result.first_token_s is None:
                    result.first_token_s = time.perf_counter() - started
                delta = text.push(token)
                result.completion_tokens = len(text.completion_ids)
                if delta.finish_reason is not None:
                    result.finish_reason = delta.finish_reason
                    yield delta
                    return
                if delta.text:
                    yield delta
        # The engine stopped early only when the context is full.
        delta = text.finish_length()
        result.finish_reason = delta.finish_reason
        yield delta

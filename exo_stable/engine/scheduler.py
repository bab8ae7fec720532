"""Continuous batching for the single device: one loop that runs every active request's next step at once.

At each step the loop takes the decode position of every request that has a token to feed (one forward call
over all of them, see :meth:`StageCompute.decode_batch`) and, beside it, the next prompt chunks of requests
still reading their prompt, up to a per-step token budget, so a long prompt is read a chunk per step while
the streams already decoding keep getting a token per step. Prompt chunks are the same fixed-size chunks as
a lone request's (:func:`prompt_chunks`), each in its own forward call, so a prompt's reading is exact.
Requests join and leave between steps. Each request's tokens wait in a buffer of a few for its reader; a
request whose reader lags is left out of the steps until it reads, so nothing grows without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from exo_stable.engine.mlx_thread import MlxThread
from exo_stable.engine.sampling import Pick, SamplingParams
from exo_stable.engine.stagecompute import StageCompute, prompt_chunks

BUFFER = 4
"""Tokens a request may have picked ahead of its reader before its steps pause."""

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
QUEUE_BUCKETS = (0, 1, 2, 4, 8, 16, 32)


class Histogram:
    """Counts of observed values per upper bound (cumulative on read, as Prometheus exposes them)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.count += 1
        self.total += value

    def cumulative(self) -> list[tuple[float, int]]:
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass
class BatchStats:
    steps: int = 0
    decode_rows: int = 0
    prompt_chunks: int = 0
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    queue_depth: Histogram = field(default_factory=lambda: Histogram(QUEUE_BUCKETS))


@dataclass
class _Stream:
    rid: str
    chunks: list[list[int]]
    params: SamplingParams
    budget: int
    out: asyncio.Queue[Pick | BaseException] = field(default_factory=lambda: asyncio.Queue(BUFFER + 1))
    chunks_done: int = 0
    position: int = 0  # tokens picked so far
    last: int = 0  # the token at position - 1, the next step's input
    opened: bool = False  # its first chunk is planned: the stage holds (or will hold) its cache

    @property
    def reading_prompt(self) -> bool:
        return self.chunks_done < len(self.chunks)

    def wants_decode(self) -> bool:
        return not self.reading_prompt and 0 < self.position < self.budget and self.out.qsize() < BUFFER


@dataclass
class _Plan:
    chunks: list[tuple[_Stream, list[int], bool, bool]]  # (stream, chunk, first, last)
    decode: list[_Stream]


class BatchScheduler:
    """Runs requests through a whole-model :class:`StageCompute` on its MLX thread, batching decode steps."""

    def __init__(self, compute: StageCompute, thread: MlxThread, *, step_tokens: int, step_timeout_s: float) -> None:
        self.compute = compute
        self.thread = thread
        self.step_tokens = step_tokens
        self.step_timeout_s = step_timeout_s
        self.stats = BatchStats()
        self._streams: dict[str, _Stream] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batch-scheduler")

    def cancel(self) -> None:
        """Stop the loop (from the event loop's thread; the requests still reading see it time out)."""
        if self._task is not None:
            self._task.cancel()

    @property
    def waiting(self) -> int:
        """Requests admitted whose prompt has not started."""
        return sum(1 for s in self._streams.values() if s.chunks_done == 0)

    async def run(self, rid: str, prompt: Sequence[int], params: SamplingParams, budget: int) -> AsyncGenerator[Pick]:
        """Yield the request's ``budget`` picks; closing the iterator retires it between steps."""
        if self._task is None or self._task.done():
            raise RuntimeError("the batch scheduler is not running")
        stream = _Stream(rid, prompt_chunks(prompt), params, budget)
        self._streams[rid] = stream
        self._wake.set()
        try:
            for _ in range(budget):
                async with asyncio.timeout(self.step_timeout_s * 2):
                    item = await stream.out.get()
                self._wake.set()  # room in the buffer: the stream may step again
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            del self._streams[rid]
            if stream.opened and self.thread.alive:
                self.thread.submit(self.compute.close, rid, timeout=self.step_timeout_s)

    def _plan(self) -> _Plan | None:
        streams = list(self._streams.values())
        decode = [s for s in streams if s.wants_decode()]
        chunks: list[tuple[_Stream, list[int], bool, bool]] = []
        spent = len(decode)
        for s in streams:
            if not s.reading_prompt:
                continue
            chunk = s.chunks[s.chunks_done]
            if chunks and spent + len(chunk) > self.step_tokens:
                break  # (the first chunk always goes: prompts are never starved)
            s.opened = True
            chunks.append((s, chunk, s.chunks_done == 0, s.chunks_done == len(s.chunks) - 1))
            spent += len(chunk)
        if not decode and not chunks:
            return None
        return _Plan(chunks, decode)

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (plan := self._plan()) is not None:
                self.stats.queue_depth.observe(self.waiting)
                if plan.decode:
                    self.stats.batch_size.observe(len(plan.decode))
                await self._run_step(plan)

    async def _run_step(self, plan: _Plan) -> None:
        chunk_jobs = [(s.rid, chunk, s.params, first, last) for s, chunk, first, last in plan.chunks]
        rows = [(s.rid, s.last, s.position) for s in plan.decode]
        try:
            firsts, picks = await self.thread.run(self._step, chunk_jobs, rows, timeout=self.step_timeout_s)
        except Exception as exc:  # every request of the step learns of it; none is left waiting
            for s in [c[0] for c in plan.chunks] + plan.decode:
                s.out.put_nowait(exc)
                s.position = s.budget
                s.chunks_done = len(s.chunks)
            return
        self.stats.steps += 1
        self.stats.decode_rows += len(plan.decode)
        self.stats.prompt_chunks += len(plan.chunks)
        for (s, _, _, last), first in zip(plan.chunks, firsts, strict=True):
            s.chunks_done += 1
            if last:
                assert first is not None
                self._deliver(s, first)
        for s, picked in zip(plan.decode, picks, strict=True):
            self._deliver(s, picked)

    @staticmethod
    def _deliver(stream: _Stream, picked: Pick) -> None:
        stream.position += 1
        stream.last = picked.token
        stream.out.put_nowait(picked)

    def _step(
        self,
        chunks: Sequence[tuple[str, list[int], SamplingParams, bool, bool]],
        rows: Sequence[tuple[str, int, int]],
    ) -> tuple[list[Pick | None], list[Pick]]:
        """One step on the MLX thread: the prompt chunks, each its own forward call, then the decode rows."""
        started = time.perf_counter()
        firsts: list[Pick | None] = []
        for rid, chunk, params, first, last in chunks:
            if first:
                self.compute.open(rid, params)
            logits = self.compute.forward(rid, mx.array([chunk], dtype=mx.int32))
            firsts.append(self.compute.choose(rid, logits, 0) if last else None)
        middle = time.perf_counter()
        self.prefill_seconds += middle - started
        picks: list[Pick] = []
        if rows:
            rids, tokens, positions = zip(*rows, strict=True)
            picks = self.compute.decode_batch(rids, tokens, positions)
        self.decode_seconds += time.perf_counter() - middle
        return firsts, picks

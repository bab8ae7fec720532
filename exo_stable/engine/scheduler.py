"""Continuous batching for the single device: one loop that runs every active request's next step at once.

The loop runs on the MLX thread, step after step while there is work, so no step waits for a round trip
through the event loop: requests join and leave through an inbox it drains between steps, and each picked
token is handed to its reader on the event loop as it comes. The loop yields the thread every
:data:`STEPS_PER_JOB` steps so other jobs (a teacher-forcing pass, a verifier's) keep their turn.

At each step the loop takes the decode position of every request that has a token to feed (one forward call
over all of them, see :meth:`StageCompute.decode_batch`) and, beside it, the next prompt chunks of requests
still reading their prompt, up to a per-step token budget, so a long prompt is read a chunk per step while
the streams already decoding keep getting a token per step. Prompt chunks are the same fixed-size chunks as
a lone request's (:func:`prompt_chunks`), each in its own forward call, so a prompt's reading is exact; while
other requests decode, a chunk's call is evaluated a few layers per step (:mod:`exo_stable.engine.slicing`),
so a step carrying it takes about twice a decode step, not a whole chunk's time.
When every decode row is a greedy request's, the next step of the rows that go on is queued on the device
before this step's tokens are read (:meth:`StageCompute.pick_rows_ahead`): the device computes it while the
host hands the tokens out and plans the next step; a step whose rows then differ (a request joined, left or
paused for its reader) is undone.
Requests join and leave between steps. Each request's tokens wait in a buffer of a few for its reader; a
request whose reader lags is left out of the steps until it reads, so nothing grows without bound.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from exo_stable.engine.histogram import BATCH_BUCKETS, QUEUE_BUCKETS, Histogram
from exo_stable.engine.mlx_thread import MlxThread
from exo_stable.engine.sampling import Pick, SamplingParams
from exo_stable.engine.slicing import PREFILL_SHARE, SliceClock, SlicedForward
from exo_stable.engine.stagecompute import StageCompute, prompt_chunks

BUFFER = 4
"""Tokens a request may have picked ahead of its reader before its steps pause."""

STEPS_PER_JOB = 32
"""Steps the loop runs per job on the MLX thread before it queues itself again behind other jobs."""

ROWS_AHEAD = True
"""Queue batched greedy steps ahead (:meth:`StageCompute.pick_rows_ahead`); read when a scheduler is made
(benchmarks turn it off to compare)."""


@dataclass
class BatchStats:
    steps: int = 0
    decode_rows: int = 0
    prompt_chunks: int = 0
    prompt_slices: int = 0  # steps that evaluated part of a prompt chunk's layers, not the rest of it
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    queue_depth: Histogram = field(default_factory=lambda: Histogram(QUEUE_BUCKETS))


@dataclass
class _Stream:
    rid: str
    chunks: list[list[int]]
    params: SamplingParams
    budget: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Pick | BaseException] = field(default_factory=asyncio.Queue)  # at most BUFFER + 1
    chunks_done: int = 0
    position: int = 0  # tokens picked so far (written by the MLX thread only)
    last: int = 0  # the token at position - 1, the next step's input
    read: int = 0  # tokens its reader took (written by the event loop only)
    failed: bool = False
    reading: SlicedForward | None = None  # the prompt chunk whose layers are being evaluated, step by step

    @property
    def reading_prompt(self) -> bool:
        return self.chunks_done < len(self.chunks)

    def wants_decode(self) -> bool:
        return not self.reading_prompt and self._wants(self.position)

    def continues(self) -> bool:
        """Whether, once this step's token is delivered, it will want the next step (as its reader stands)."""
        return self._wants(self.position + 1)

    def _wants(self, position: int) -> bool:
        """Whether a decoding stream that has picked ``position`` tokens takes the next step: not failed, its
        budget not spent, its reader no more than :data:`BUFFER` tokens behind."""
        return not self.failed and 0 < position < self.budget and position - self.read < BUFFER

    def hand(self, item: Pick | BaseException) -> None:
        """Give the reader a pick or an error (from the MLX thread)."""
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


def _put_all(handed: list[tuple[_Stream, Pick]]) -> None:
    """Put each pick in its stream's queue (on the readers' event loop)."""
    for stream, pick in handed:
        stream.out.put_nowait(pick)


@dataclass
class _Plan:
    chunks: list[tuple[_Stream, list[int], bool, bool]]  # (stream, chunk, first, last)
    decode: list[_Stream]


class BatchScheduler:
    """Runs requests through a whole-model :class:`StageCompute` on its MLX thread, batching decode steps."""

    def __init__(
        self,
        compute: StageCompute,
        thread: MlxThread,
        *,
        step_tokens: int,
        step_timeout_s: float,
        lookahead: bool,
        prefill_share: float | None = PREFILL_SHARE,
    ) -> None:
        self.compute = compute
        self.lookahead = lookahead
        self.rows_ahead = lookahead and ROWS_AHEAD
        self.thread = thread
        self.step_tokens = step_tokens
        self.step_timeout_s = step_timeout_s
        self.stats = BatchStats()
        self.clock = SliceClock(prefill_share)
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self._lock = threading.Lock()
        self._inbox: deque[tuple[str, _Stream]] = deque()  # ("join" | "leave" | "read", stream)
        self._queued = False  # a loop job is queued or running on the MLX thread
        self._streams: dict[str, _Stream] = {}  # MLX thread only

    @property
    def waiting(self) -> int:
        """Requests admitted whose prompt has not started (MLX thread)."""
        return sum(1 for s in self._streams.values() if s.chunks_done == 0)

    def _post(self, kind: str, stream: _Stream) -> None:
        """Tell the loop (from the event loop), queuing a loop job unless one is queued or running."""
        with self._lock:
            self._inbox.append((kind, stream))
            if self._queued:
                return
            self._queued = True
        try:
            self.thread.submit(self._drive, timeout=self.step_timeout_s)
        except BaseException:
            with self._lock:
                self._queued = False
            raise

    async def run(self, rid: str, prompt: Sequence[int], params: SamplingParams, budget: int) -> AsyncGenerator[Pick]:
        """Yield the request's ``budget`` picks; closing the iterator retires it between steps."""
        stream = _Stream(rid, prompt_chunks(prompt), params, budget, asyncio.get_running_loop())
        self._post("join", stream)
        try:
            for _ in range(budget):
                async with asyncio.timeout(self.step_timeout_s):
                    item = await stream.out.get()
                if isinstance(item, BaseException):
                    raise item
                stream.read += 1
                if stream.position - stream.read >= BUFFER - 1:
                    self._post("read", stream)  # it may have paused for its reader: room again
                yield item
        finally:
            if self.thread.alive:
                self._post("leave", stream)

    # ---- the MLX thread's side ------------------------------------------------------------------------------

    def _drive(self) -> None:
        try:
            self._steps()
        except BaseException as exc:  # a fault outside a step's compute: every reader learns of it
            with self._lock:
                self._queued = False
            for s in self._streams.values():
                s.failed = True
                s.hand(exc)
            raise

    def _steps(self) -> None:
        for _ in range(STEPS_PER_JOB):
            self._drain()
            plan = self._plan()
            if plan is None:
                with self._lock:
                    if not self._inbox:
                        self._queued = False
                        return
                continue
            self.stats.queue_depth.observe(self.waiting)
            if plan.decode:
                self.stats.batch_size.observe(len(plan.decode))
            self._run_step(plan)
        self._drain()
        self.thread.submit(self._drive, timeout=self.step_timeout_s)  # more work: queue behind other jobs

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._inbox:
                    return
                kind, stream = self._inbox.popleft()
            if kind == "join":
                self._streams[stream.rid] = stream
            elif kind == "leave" and self._streams.pop(stream.rid, None) is not None:
                self.compute.close(stream.rid)

    def _plan(self) -> _Plan | None:
        streams = list(self._streams.values())
        decode = [s for s in streams if s.wants_decode()]
        chunks: list[tuple[_Stream, list[int], bool, bool]] = []
        spent = len(decode)
        for s in streams:
            if s.failed or not s.reading_prompt:
                continue
            chunk = s.chunks[s.chunks_done]
            if chunks and spent + len(chunk) > self.step_tokens:
                break  # (the first chunk always goes: prompts are never starved)
            chunks.append((s, chunk, s.chunks_done == 0, s.chunks_done == len(s.chunks) - 1))
            spent += len(chunk)
        if not decode and not chunks:
            return None
        return _Plan(chunks, decode)

    def _run_step(self, plan: _Plan) -> None:
        try:
            firsts, picks = self._step(plan)
        except Exception as exc:  # every request of the step learns of it; none is left waiting
            for s in [c[0] for c in plan.chunks] + plan.decode:
                s.failed = True
                s.hand(exc)
            return
        self.stats.steps += 1
        self.stats.decode_rows += len(plan.decode)
        picked: list[tuple[_Stream, Pick]] = []
        for (s, _, _, last), outcome in zip(plan.chunks, firsts, strict=True):
            if outcome is None:
                continue  # the step's budget was spent before this chunk: it goes at the next step
            read, first = outcome
            if not read:
                self.stats.prompt_slices += 1
                continue  # its chunk's layers go on at the next step
            self.stats.prompt_chunks += 1
            s.chunks_done += 1
            if last:
                assert first is not None
                picked.append((s, first))
        picked += zip(plan.decode, picks, strict=True)
        self._deliver(picked)

    @staticmethod
    def _deliver(picked: list[tuple[_Stream, Pick]]) -> None:
        """Hand each stream its pick, waking the readers' event loop once per step (not once per stream)."""
        loops: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Pick]]] = {}
        for stream, pick in picked:
            stream.last = pick.token
            stream.position += 1
            loops.setdefault(stream.loop, []).append((stream, pick))
        for loop, handed in loops.items():
            loop.call_soon_threadsafe(_put_all, handed)

    def _step(self, plan: _Plan) -> tuple[list[tuple[bool, Pick | None] | None], list[Pick]]:
        """The prompt chunks, each its own forward call (while others decode, slices of their layers within
        the step's budget), then the decode rows in one. Per chunk: None when the budget left it for the next
        step, else whether it was read through and the first pick of a prompt's last chunk."""
        started = time.perf_counter()
        # A step queued ahead at the last step is computing: it finishes before this step's prompt slices are
        # timed (it is this step's decode rows' time).
        settled = self.compute.settle() if plan.chunks else 0.0
        started += settled
        within = self.clock.budget(decoding=bool(plan.decode))
        firsts: list[tuple[bool, Pick | None] | None] = []
        for i, (s, chunk, first, last) in enumerate(plan.chunks):
            if within is not None and within <= 0 and i > 0:
                firsts.append(None)
                continue
            read, pick, spent = self._read(s, chunk, first, last, within)
            firsts.append((read, pick))
            if within is not None:
                within -= spent
        middle = time.perf_counter()
        self.prefill_seconds += middle - started
        picks: list[Pick] = []
        rows = plan.decode
        alone = rows[0] if len(rows) == 1 and not plan.chunks else None
        if alone is not None and self.lookahead and alone.params.plain_greedy:
            # One greedy stream and nothing else: its next step is queued on the device before this one's
            # token is read (StageCompute.pick_ahead; undone if the next step is another kind).
            more = alone.position + 1 < alone.budget
            picks = [Pick(self.compute.pick_ahead(alone.rid, [alone.last], queue_next=more))]
        elif self._ahead(rows):
            # Greedy rows in one call: the batched step of those that go on is queued before this one's tokens
            # are read (StageCompute.pick_rows_ahead; undone when the next step's rows are others).
            follow = [i for i, s in enumerate(rows) if s.continues()]
            rids, tokens = [s.rid for s in rows], [s.last for s in rows]
            picks = [Pick(token) for token in self.compute.pick_rows_ahead(rids, tokens, follow)]
            self.clock.decoded(time.perf_counter() - middle + settled)
        elif rows:
            picks = self.compute.decode_batch([s.rid for s in rows], [s.last for s in rows], [s.position for s in rows])
            self.clock.decoded(time.perf_counter() - middle + settled)
        self.decode_seconds += time.perf_counter() - middle + settled
        return firsts, picks

    def _ahead(self, rows: list[_Stream]) -> bool:
        """Whether ``rows`` decode as one batched call queued ahead: greedy rows that fit one call."""
        return (
            self.rows_ahead and 2 <= len(rows) <= self.compute.batch_limit and all(s.params.plain_greedy for s in rows)
        )

    def _read(
        self, s: _Stream, chunk: list[int], first: bool, last: bool, within: float | None
    ) -> tuple[bool, Pick | None, float]:
        """Evaluate the next slice of a prompt chunk's layers (``within``: seconds left of the step's budget;
        None: all of them): whether the chunk is read through, the first pick of a prompt's last chunk, and
        the slice's seconds."""
        if s.reading is None:
            if first:
                self.compute.open(s.rid, s.params)
            s.reading = self.compute.begin(s.rid, mx.array([chunk], dtype=mx.int32), logits=last)
        call = s.reading
        done = call.advance(self.clock.layers(call.left, call.positions, within))
        self.clock.sliced(call.stepped, call.positions, call.stepped_s)
        if not done:
            return False, None, call.stepped_s
        s.reading = None
        pick = self.compute.choose(s.rid, call.result, 0) if last and call.result is not None else None
        return True, pick, call.stepped_s

"""A stage's inbox of ready steps and how it forms one compute step from them (continuous batching).

The stage actor takes a step in (token ids on stage 0, an assembled activation elsewhere), checks it, and
queues it here as a :class:`ReadyStep`. Its batch loop then takes, at each compute step, what
:meth:`StepQueue.take` picks:

- the decode steps (one position each) of up to ``max_batch`` requests, run together as one
  ``forward_batch`` call, each row with its own cache;
- beside them, prompt chunks in arrival order while the step's token budget allows, and always the oldest
  one: a prompt chunk never waits behind more than one compute step, and a long prompt never holds the
  streams that are already decoding for more than one chunk per step.

Steps of one request stay in their order: a step is taken only when no earlier step of its request is left
behind in the queue, and at most one step per request goes into one compute step.

The queue is bounded (:meth:`StepQueue.wait_room`): a stage that falls behind stops taking messages in, its
mailbox fills, and its senders wait (back-pressure over the links). No MLX and no IO here.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

from exo_stable.wire.messages import StepHop, TensorPayload


@dataclass(frozen=True, slots=True)
class ReadyStep:
    """One request's step, checked and ready to compute."""

    rid: str
    request: Any  # the stage's StageRequest this step was taken in for (a reopened request is another one)
    step: int
    position: int
    final: bool
    arrived_wall: float
    arrived_clock: float
    tokens: tuple[int, ...] = ()
    tensor: TensorPayload | None = None
    hops: tuple[StepHop, ...] = ()

    @property
    def width(self) -> int:
        """Positions this step feeds through the layers."""
        return len(self.tokens) if self.tensor is None else int(self.tensor.shape[1])

    @property
    def wire(self) -> tuple[str, tuple[int, ...], bytes] | None:
        """The activation as it came (dtype, shape, exact bytes), or None for token ids."""
        t = self.tensor
        return None if t is None else (t.dtype, tuple(t.shape), t.data)

    @property
    def is_decode(self) -> bool:
        """A one-position step: it can share a batched forward call with other requests' steps."""
        return self.width == 1


@dataclass(frozen=True, slots=True)
class ComputeStep:
    """What one turn of the batch loop computes: decode rows (one call) and prompt chunks (one call each)."""

    decode: tuple[ReadyStep, ...]
    chunks: tuple[ReadyStep, ...]
    depth: int  # steps queued when it was formed (these included)

    def __len__(self) -> int:
        return len(self.decode) + len(self.chunks)


class StepQueue:
    """The stage's bounded queue of ready steps, in arrival order (one event loop; not thread-safe)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a step queue holds at least one step")
        self.capacity = capacity
        self._steps: deque[ReadyStep] = deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._steps)

    async def wait_room(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait (at most ``timeout`` seconds) until the queue has room for one more step."""
        async with asyncio.timeout(timeout):
            while len(self._steps) >= self.capacity:
                self._room.clear()
                await self._room.wait()

    def put(self, step: ReadyStep) -> None:
        if len(self._steps) >= self.capacity:
            raise RuntimeError("step queue full: wait_room first")
        self._steps.append(step)
        self._ready.set()

    async def wait_ready(self) -> None:
        """Wait until at least one step is queued (the batch loop's idle wait; it has no deadline because an
        idle stage may wait for its next request indefinitely: the loop is cancelled when the actor stops)."""
        while not self._steps:
            self._ready.clear()
            await self._ready.wait()

    def decode_waiting(self) -> int:
        """Decode steps queued, not taken yet."""
        return sum(1 for s in self._steps if s.is_decode)

    def discard(self, rid: str) -> int:
        """Drop the queued steps of ``rid`` (closed or failed here); returns how many."""
        kept = deque(s for s in self._steps if s.rid != rid)
        dropped = len(self._steps) - len(kept)
        self._steps = kept
        if dropped:
            self._room.set()
        return dropped

    def take(self, *, max_batch: int, token_budget: int, chunks: bool = True) -> ComputeStep:
        """Remove and return the next compute step (see the module docstring); empty when nothing is queued.
        ``chunks=False``: decode steps only (the stage is still reading a prompt chunk taken before)."""
        depth = len(self._steps)
        decode: list[ReadyStep] = []
        taken: list[ReadyStep] = []
        blocked: set[str] = set()  # requests with an earlier step left in the queue (or already taken)
        left: deque[ReadyStep] = deque()
        budget = token_budget
        for step in self._steps:
            if step.rid in blocked:
                left.append(step)
                continue
            blocked.add(step.rid)
            if step.is_decode and len(decode) < max(1, max_batch) and budget >= 1:
                decode.append(step)
                budget -= 1
            elif not step.is_decode and chunks and (not taken or step.width <= budget):
                taken.append(step)  # the oldest chunk always goes: it waits behind one compute step at most
                budget -= step.width
            else:
                left.append(step)
        self._steps = left
        if len(left) < self.capacity:
            self._room.set()
        return ComputeStep(tuple(decode), tuple(taken), depth)


__all__ = ["ComputeStep", "ReadyStep", "StepQueue"]

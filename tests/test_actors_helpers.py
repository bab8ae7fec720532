"""Shared helpers for the actors tests: a journal to wait on, a scriptable worker, a fake clock, and the
event-loop guard that fails a test on "Task exception was never retrieved" or on a task left running.

Nothing here sleeps: tests wait on the journal (an event) with a deadline.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from actors import Actor, Down

T = TypeVar("T")

DEADLINE = 5.0
"""Generous deadline for waits that should end at once; a hang fails instead of blocking the suite."""


@asynccontextmanager
async def loop_guard() -> AsyncIterator[list[dict[str, Any]]]:
    """Record what asyncio reports to the loop's exception handler; fail if anything was reported or if a
    task outlives the test."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
        gc.collect()
        me = asyncio.current_task()
        leftover = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        assert not leftover, f"tasks left running: {leftover}"
        assert not errors, f"asyncio reported: {[c.get('message') for c in errors]}"
    finally:
        loop.set_exception_handler(previous)


def started(coro: Coroutine[Any, Any, T]) -> Awaitable[asyncio.Task[T]]:
    """Start ``coro`` as a task and return it once it has run its first step (up to its first suspension).

    Deterministic, not a timed wait: the task's first step is already in the loop's FIFO ready queue, so a
    callback scheduled after it runs after it.
    """

    async def run() -> asyncio.Task[T]:
        loop = asyncio.get_running_loop()
        task = loop.create_task(coro)
        after: asyncio.Future[None] = loop.create_future()
        loop.call_soon(after.set_result, None)
        await after
        return task

    return run()


class Journal:
    """An append-only list of events that tests can wait on (no polling, no sleeping)."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self._changed = asyncio.Event()

    def record(self, event: str) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = DEADLINE) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while not predicate(self.events):
                self._changed.clear()
                await self._changed.wait()

    async def wait_event(self, event: str, count: int = 1, timeout: float = DEADLINE) -> None:  # noqa: ASYNC109
        await self.wait_for(lambda ev: ev.count(event) >= count, timeout)

    def only(self, prefix: str) -> list[str]:
        return [e for e in self.events if e.startswith(prefix)]


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---- messages -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Crash:
    error: str = "crash"


@dataclass(frozen=True)
class Exit:
    pass


@dataclass(frozen=True)
class Block:
    """Handler waits until the event is set (bounded by DEADLINE)."""

    gate: asyncio.Event


@dataclass(frozen=True)
class Add:
    value: int


@dataclass(frozen=True)
class Get:
    pass


class Boom(Exception):
    """The error the test actors raise on purpose."""


Msg = Ping | Crash | Exit | Block | Add | Get | Down


@dataclass
class Script:
    """What a Worker does at each stage of its life."""

    start_gate: asyncio.Event | None = None
    fail_start: bool = False
    stop_gate: asyncio.Event | None = None
    fail_stop: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Worker(Actor[Msg]):
    """A scriptable actor that journals its lifecycle as ``<name>.<event>``."""

    def __init__(self, label: str, journal: Journal, script: Script | None = None) -> None:
        self.label = label
        self.journal = journal
        self.script = script or Script()
        self.total = 0
        self.downs: list[Down] = []

    async def on_start(self) -> None:
        self.journal.record(f"{self.label}.starting")
        if self.script.start_gate is not None:
            async with asyncio.timeout(DEADLINE):
                await self.script.start_gate.wait()
        if self.script.fail_start:
            self.journal.record(f"{self.label}.start_failed")
            raise Boom(f"{self.label} refuses to start")
        self.journal.record(f"{self.label}.start")

    async def on_stop(self) -> None:
        self.journal.record(f"{self.label}.stop")
        if self.script.stop_gate is not None:
            await self.script.stop_gate.wait()  # deliberately unbounded: the runtime's timeout must cut it
        if self.script.fail_stop:
            raise Boom(f"{self.label} on_stop failed")

    async def on_failure(self, exc: BaseException) -> None:
        self.journal.record(f"{self.label}.failure:{type(exc).__name__}")

    async def receive(self, message: Msg) -> Any:
        match message:
            case Ping():
                return self.label
            case Crash(error):
                raise Boom(error)
            case Exit():
                self.stop_self()
                return None
            case Block(gate):
                self.journal.record(f"{self.label}.blocked")
                async with asyncio.timeout(DEADLINE):
                    await gate.wait()
                return "released"
            case Add(value):
                self.total += value
                return self.total
            case Get():
                return self.total
            case Down():
                self.downs.append(message)
                self.journal.record(f"{self.label}.down:{message.ref_name}:{message.reason!s}")
                return None


def worker_factory(label: str, journal: Journal, script: Script | None = None) -> Callable[[], Worker]:
    """A ChildSpec factory making a fresh Worker (same label, shared script) for every start."""
    return lambda: Worker(label, journal, script)

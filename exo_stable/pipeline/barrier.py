"""DistributedBarrier: wait until every named member has arrived, with a deadline and bounded retries.

A barrier never hangs: each attempt waits at most ``timeout`` seconds; between attempts ``on_retry`` is
called with the members still missing (the creator re-sends whatever they should answer); after the last
attempt :class:`BarrierTimeout` names who never came. A member that arrives with ``ok=False`` fails the
barrier at once (:class:`BarrierFailed`), with its reason.

The BarrierActor keeps the barriers of a node by name and routes arrivals from peers to them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from actors import Actor, ActorRef
from exo_stable.wire.messages import BarrierArrive, BarrierStatus, SyncState

RetryHook = Callable[[frozenset[str], int], Awaitable[None]]


class BarrierError(RuntimeError):
    """The barrier did not release."""

    def __init__(
        self, name: str, message: str, missing: frozenset[str], failures: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.name = name
        self.missing = missing
        self.failures: dict[str, str] = dict(failures or {})  # member: why it could not arrive


class BarrierTimeout(BarrierError, TimeoutError):
    """Some members never arrived; they are named."""


class BarrierFailed(BarrierError):
    """A member reported that it cannot arrive."""


@dataclass(frozen=True, slots=True)
class SyncResult:
    name: str
    members: frozenset[str]
    attempts: int
    elapsed_s: float
    status: BarrierStatus = BarrierStatus.RELEASED


@dataclass
class DistributedBarrier:
    """One named barrier over a fixed set of members."""

    name: str
    members: frozenset[str]
    on_retry: RetryHook | None = None
    clock: Callable[[], float] = time.monotonic
    arrived: set[str] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)
    status: BarrierStatus = BarrierStatus.PENDING
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _deadline: float | None = None

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError(f"barrier {self.name!r} has no members")

    @property
    def missing(self) -> frozenset[str]:
        return self.members - self.arrived

    def arrive(self, member: str, *, ok: bool = True, detail: str = "") -> bool:
        """Record an arrival; returns False for a stranger (ignored) or a repeat."""
        if member not in self.members or member in self.arrived or member in self.failures:
            return False
        if ok:
            self.arrived.add(member)
        else:
            self.failures[member] = detail or "refused"
        self._changed.set()
        return True

    async def validate_sync_state(self) -> bool:
        """True once every member has arrived and none failed."""
        return not self.missing and not self.failures

    async def sync_with_timeout(self, timeout: float, retry_count: int) -> SyncResult:  # noqa: ASYNC109
        """Wait for everyone: ``1 + retry_count`` attempts of at most ``timeout`` seconds each."""
        started = self.clock()
        for attempt in range(retry_count + 1):
            if attempt and self.on_retry is not None:
                await self.on_retry(self.missing, attempt)
            self._deadline = self.clock() + timeout
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        if self.failures:
                            self.status = BarrierStatus.FAILED
                            who = ", ".join(f"{m}: {why}" for m, why in sorted(self.failures.items()))
                            raise BarrierFailed(
                                self.name, f"barrier {self.name} failed ({who})", self.missing, self.failures
                            )
                        if not self.missing:
                            self.status = BarrierStatus.RELEASED
                            return SyncResult(self.name, self.members, attempt + 1, self.clock() - started)
                        self._changed.clear()
                        await self._changed.wait()
            except TimeoutError:
                continue
        self.status = BarrierStatus.TIMED_OUT
        missing = ", ".join(sorted(self.missing))
        raise BarrierTimeout(
            self.name,
            f"barrier {self.name} timed out after {retry_count + 1} attempts of {timeout:.1f}s; missing: {missing}",
            self.missing,
        )

    def state(self) -> SyncState:
        remaining = 0.0 if self._deadline is None else max(0.0, self._deadline - self.clock())
        return SyncState(
            participating_devices=tuple(sorted(self.members)),
            sync_timestamp=datetime.now(UTC),
            barrier_status=self.status,
            timeout_remaining=remaining,
            barrier_name=self.name,
        )


@dataclass(frozen=True, slots=True)
class OpenBarrier:
    """Ask the BarrierActor for a new barrier (the reply is the DistributedBarrier)."""

    name: str
    members: frozenset[str]
    on_retry: RetryHook | None = None


@dataclass(frozen=True, slots=True)
class CloseBarrier:
    name: str


BarrierMessage = OpenBarrier | CloseBarrier | BarrierArrive


class BarrierActor(Actor[BarrierMessage]):
    """The node's barriers by name; arrivals from peers are told to it and routed to their barrier."""

    mailbox_size = 4096

    def __init__(self, *, max_barriers: int = 4096) -> None:
        super().__init__()
        self.max_barriers = max_barriers
        self.barriers: dict[str, DistributedBarrier] = {}
        self.strays = 0

    async def receive(self, message: BarrierMessage) -> Any:
        match message:
            case OpenBarrier(name, members, on_retry):
                if name in self.barriers:
                    raise ValueError(f"barrier {name!r} already exists")
                if len(self.barriers) >= self.max_barriers:
                    raise RuntimeError(f"more than {self.max_barriers} barriers open")
                barrier = DistributedBarrier(name, members, on_retry)
                self.barriers[name] = barrier
                return barrier
            case CloseBarrier(name):
                self.barriers.pop(name, None)
                return None
            case BarrierArrive(name=name, member=member, ok=ok, detail=detail):
                target = self.barriers.get(name)
                if target is None or not target.arrive(member, ok=ok, detail=detail):
                    self.strays += 1
                return None

    def open_names(self) -> Iterable[str]:
        return tuple(self.barriers)


class Barriers:
    """A handle on the node's BarrierActor: open a barrier for the duration of a block."""

    def __init__(self, ref: ActorRef[BarrierMessage], *, timeout_s: float = 5.0) -> None:
        self.ref = ref
        self.timeout_s = timeout_s

    @asynccontextmanager
    async def opened(
        self, name: str, members: frozenset[str], on_retry: RetryHook | None = None
    ) -> AsyncIterator[DistributedBarrier]:
        barrier: DistributedBarrier = await self.ref.ask(OpenBarrier(name, members, on_retry), timeout=self.timeout_s)
        try:
            yield barrier
        finally:
            await self.ref.tell(CloseBarrier(name), timeout=self.timeout_s)

    async def arrive(self, message: BarrierArrive) -> None:
        await self.ref.tell(message, timeout=self.timeout_s)

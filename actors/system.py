"""ActorSystem: the root that owns every top-level actor.

.. code-block:: python

    async with ActorSystem("node") as system:
        await system.spawn(Supervisor("node", children=[...]))
        failure = await system.wait_failed(timeout=None)  # a root actor crashed or a supervisor gave up

Leaving the ``async with`` block stops the top-level actors in reverse spawn order, each within its shutdown
timeout; supervisors stop their own children the same way, so the whole tree is gone, every task awaited,
when the block exits.

A top-level actor is not restarted: put it under a :class:`~actors.Supervisor` for that. When one crashes
(for a supervisor: when it exceeded its restart intensity) the system logs it, records a :class:`Failure`
and wakes ``wait_failed``; what to do next is the owner's decision.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from actors.actor import Actor
from actors.cell import Cell
from actors.monitor import ExitReason
from actors.ref import ActorRef
from actors.stats import ActorStats

M = TypeVar("M")

log = logging.getLogger("actors")


@dataclass(frozen=True, slots=True)
class Failure:
    """A top-level actor that crashed: its name, path and the exception."""

    name: str
    path: str
    reason: BaseException


class ActorSystem:
    """Owner of the top-level actors; an async context manager."""

    def __init__(self, name: str = "system", *, shutdown_timeout: float = 5.0) -> None:
        self.name = name
        self.shutdown_timeout = shutdown_timeout
        self._cells: dict[str, Cell[Any]] = {}
        self._failures: list[Failure] = []
        self._failed = asyncio.Event()
        self._open = False
        self._closing = False

    async def __aenter__(self) -> ActorSystem:
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    async def spawn(
        self,
        actor: Actor[M],
        *,
        name: str | None = None,
        mailbox_size: int | None = None,
        start_timeout: float = 60.0,
        shutdown_timeout: float | None = None,
    ) -> ActorRef[M]:
        """Start ``actor`` as a top-level actor; return once its ``on_start`` succeeded.

        Raises ``StartFailed`` if it does not start, ``ValueError`` if ``name`` is taken.
        """
        if not self._open or self._closing:
            raise RuntimeError(f"actor system {self.name!r} is not running")
        if name is None:
            name = self._free_name(actor.default_name())
        elif name in self._cells:
            raise ValueError(f"actor name {name!r} is taken")
        if not name or "/" in name:
            raise ValueError(f"invalid actor name {name!r}")
        cell: Cell[M] = Cell(
            actor,
            name=name,
            path=f"{self.name}/{name}",
            capacity=mailbox_size or actor.mailbox_size,
            on_exit=self._exited,
            shutdown_timeout=self.shutdown_timeout if shutdown_timeout is None else shutdown_timeout,
        )
        self._cells[name] = cell
        try:
            await cell.start(start_timeout)
        except BaseException:
            if self._cells.get(name) is cell:
                del self._cells[name]
            raise
        return cell.ref

    async def shutdown(self) -> None:
        """Stop every top-level actor, last spawned first, each within its shutdown timeout."""
        self._closing = True
        try:
            while self._cells:
                name, cell = next(reversed(self._cells.items()))
                await cell.stop(cell.shutdown_timeout)
                if self._cells.get(name) is cell:
                    del self._cells[name]
        finally:
            self._open = False

    @property
    def failures(self) -> list[Failure]:
        """Every top-level crash so far, oldest first."""
        return list(self._failures)

    async def wait_failed(self, timeout: float | None) -> Failure:  # noqa: ASYNC109
        """Wait for the first top-level crash (returns at once if there was one).

        ``timeout`` is required: pass ``None`` explicitly to wait without a deadline (a server's main loop).
        Raises ``TimeoutError`` past the deadline.
        """
        async with asyncio.timeout(timeout):
            await self._failed.wait()
        return self._failures[0]

    def actors(self) -> list[ActorRef[Any]]:
        """The running top-level actors, in spawn order."""
        return [cell.ref for cell in self._cells.values()]

    def statistics(self) -> list[ActorStats]:
        """A snapshot of every top-level actor (supervisors include their children)."""
        return [cell.actor.statistics() for cell in self._cells.values()]

    def _exited(self, cell: Cell[Any], reason: ExitReason) -> None:
        if self._cells.get(cell.name) is cell:
            del self._cells[cell.name]
        if isinstance(reason, BaseException):
            log.error("actor system %s: top-level actor %s failed: %r", self.name, cell.path, reason)
            self._failures.append(Failure(cell.name, cell.path, reason))
            self._failed.set()

    def _free_name(self, base: str) -> str:
        if base not in self._cells:
            return base
        n = 2
        while f"{base}-{n}" in self._cells:
            n += 1
        return f"{base}-{n}"

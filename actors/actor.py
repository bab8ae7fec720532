"""Actor: the user half of an actor. Subclass it, override the hooks, spawn it.

.. code-block:: python

    class Counter(Actor[Inc | Get]):
        async def on_start(self) -> None:
            self.n = 0

        async def receive(self, message: Inc | Get) -> int | None:
            match message:
                case Inc(by):
                    self.n += by
                case Get():
                    return self.n
            return None

    async with ActorSystem("demo") as system:
        counter = await system.spawn(Counter(), name="counter")
        await counter.tell(Inc(2))
        assert await counter.ask(Get(), timeout=1.0) == 2

Hooks, all run on the actor's own task, one at a time:

- ``on_start``: before any message; spawning returns only once it succeeded. If it raises, the spawn
  raises ``StartFailed`` and neither ``on_failure`` nor ``on_stop`` runs.
- ``receive``: one message at a time. For an ``ask`` its return value is the reply and an exception it
  raises goes back to the caller; for a ``tell`` (or a ``Down``) an exception crashes the actor.
- ``on_failure(exc)``: after a crash, before ``on_stop``.
- ``on_stop``: always, after a normal stop, a shutdown or a crash.

An instance is spawned once; a supervisor makes a fresh one from its factory for every restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from actors.monitor import NORMAL

if TYPE_CHECKING:
    from actors.cell import Cell
    from actors.ref import ActorRef
    from actors.stats import ActorStats

M = TypeVar("M")
T = TypeVar("T")


class Actor(Generic[M]):
    """Base class of actors handling messages of type ``M``."""

    mailbox_size: ClassVar[int] = 1024
    """Default mailbox capacity; a spawn (or a ``ChildSpec``) may override it."""

    _cell: Cell[M] | None = None

    # ---- hooks to override -----------------------------------------------------------------------------

    async def on_start(self) -> None:
        """Set up; runs before the first message. Raise to refuse to start."""

    async def on_stop(self) -> None:
        """Clean up; runs last, whatever the reason of the stop."""

    async def on_failure(self, exc: BaseException) -> None:
        """Runs after a crash, before ``on_stop``, with the exception that crashed the actor."""

    async def receive(self, message: M) -> Any:
        """Handle one message; for an ``ask`` the return value is the reply."""
        raise NotImplementedError(f"{type(self).__name__} does not handle messages")

    # ---- helpers for the actor itself ------------------------------------------------------------------

    @property
    def ref(self) -> ActorRef[M]:
        """This actor's own ref, valid from ``on_start`` on."""
        return self._require_cell().ref

    @property
    def name(self) -> str:
        """The name the actor was spawned under."""
        return self._require_cell().name

    @property
    def path(self) -> str:
        """The full name, owners first, joined by ``/``."""
        return self._require_cell().path

    def start_task(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        """Run ``coro`` as a background task owned by this actor.

        The task is cancelled (and awaited) when the actor stops; if it raises, the actor crashes with that
        exception, interrupting the handler that is running, and its supervisor decides what comes next.
        """
        return self._require_cell().start_task(coro, name)

    def watch(self, other: ActorRef[Any]) -> None:
        """Receive a ``Down`` message when ``other`` ends (at once, if it already has)."""
        self._require_cell().watch(other._cell)

    def unwatch(self, other: ActorRef[Any]) -> None:
        """Stop watching ``other``."""
        self._require_cell().unwatch(other._cell)

    def stop_self(self) -> None:
        """End this actor normally once the current message is handled (exit reason ``Normal``)."""
        self._require_cell().request_stop(NORMAL)

    def statistics(self) -> ActorStats:
        """A snapshot of this actor's state and counters."""
        return self._require_cell().statistics()

    def default_name(self) -> str:
        """The name used when a spawn gives none."""
        return type(self).__name__

    # ---- runtime plumbing ------------------------------------------------------------------------------

    def _attach(self, cell: Cell[M]) -> None:
        if self._cell is not None:
            raise RuntimeError(f"{type(self).__name__} instance was already spawned; spawn a new instance")
        self._cell = cell

    def _require_cell(self) -> Cell[M]:
        cell = self._cell
        if cell is None:
            raise RuntimeError(f"{type(self).__name__} is not spawned yet")
        return cell

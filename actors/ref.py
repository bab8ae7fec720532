"""ActorRef: the only handle on a running actor.

A ref names one *incarnation* of an actor (as an Erlang pid does): when a supervisor restarts a child, the
new incarnation has a new ref, and the old ref answers ``ActorDead``. Ask the supervisor
(``Supervisor.child_ref``) for the current one.

- ``tell`` enqueues a message; when the bounded mailbox is full it waits up to ``timeout`` for room
  (back-pressure) and then raises ``MailboxFull``.
- ``ask`` enqueues a request and waits for the reply; one deadline covers both. It raises ``AskTimeout``,
  ``ActorDead`` (also when the actor dies with the request pending), or the handler's own exception.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from actors.errors import ActorDead, AskTimeout, MailboxFull
from actors.mailbox import MailboxClosed

if TYPE_CHECKING:
    from actors.cell import Cell
    from actors.monitor import ExitReason
    from actors.stats import ActorStats

M = TypeVar("M")


class ActorRef(Generic[M]):
    """Send messages to an actor, stop it, watch its health. Cheap to copy and to pass around."""

    __slots__ = ("_cell", "name")

    def __init__(self, cell: Cell[M]) -> None:
        self._cell = cell
        self.name = cell.name

    def __repr__(self) -> str:
        return f"<ActorRef {self._cell.path} {self._cell.state.value}>"

    @property
    def path(self) -> str:
        """The actor's full name: its owners' names and its own, joined by ``/``."""
        return self._cell.path

    def is_alive(self) -> bool:
        """True from the end of ``on_start`` until the actor starts stopping."""
        return self._cell.exit_reason is None and not self._cell.mailbox.closed

    @property
    def exit_reason(self) -> ExitReason | None:
        """Why the actor ended, or None while it runs."""
        return self._cell.exit_reason

    # ---- messages --------------------------------------------------------------------------------------

    def tell_nowait(self, message: M) -> None:
        """Enqueue ``message`` now; raise ``MailboxFull`` if there is no room, ``ActorDead`` if dead."""
        cell = self._cell
        try:
            cell.mailbox.put_nowait((message, None))
        except MailboxClosed:
            raise ActorDead(cell.path, cell.exit_reason) from None

    async def tell(self, message: M, *, timeout: float | None = 5.0) -> None:  # noqa: ASYNC109
        """Enqueue ``message``, waiting up to ``timeout`` seconds for room (``None``: as long as it takes).

        Raises ``MailboxFull`` when the deadline passes first, ``ActorDead`` if the actor is (or becomes)
        dead before the message is enqueued.
        """
        cell = self._cell
        mb = cell.mailbox
        try:
            if len(mb.items) < mb.capacity and not mb.waiting_producers():
                mb.put_nowait((message, None))
            else:
                await mb.put((message, None), timeout)
        except MailboxClosed:
            raise ActorDead(cell.path, cell.exit_reason) from None

    async def ask(self, message: M, *, timeout: float) -> Any:  # noqa: ASYNC109
        """Send ``message`` and return the handler's result, all within ``timeout`` seconds.

        Raises ``AskTimeout`` past the deadline (a full mailbox counts against it), ``ActorDead`` if the
        actor is dead or dies before replying, or whatever exception the handler raised (the actor goes
        on). A request whose caller has already given up is dropped unhandled.
        """
        cell = self._cell
        if cell.task is not None and cell.task is asyncio.current_task():
            raise RuntimeError(f"actor {cell.path} cannot ask itself (it would wait for itself)")
        mb = cell.mailbox
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        handle = loop.call_later(timeout, expire_reply, reply, cell.path, timeout)
        envelope = (message, reply)
        try:
            if len(mb.items) < mb.capacity and not mb.waiting_producers():
                mb.put_nowait(envelope)
            else:
                await mb.put(envelope, timeout)
        except BaseException as exc:
            handle.cancel()
            if not reply.done():
                reply.cancel()
            elif not reply.cancelled():
                reply.exception()  # mark the timer's AskTimeout retrieved: we raise our own below
            if isinstance(exc, MailboxFull):
                raise AskTimeout(f"{cell.path!r} mailbox stayed full for {timeout:g}s") from None
            if isinstance(exc, MailboxClosed):
                raise ActorDead(cell.path, cell.exit_reason) from None
            raise
        try:
            return await reply
        finally:
            handle.cancel()

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def stop(self, *, timeout: float = 5.0) -> ExitReason | None:  # noqa: ASYNC109
        """Stop the actor: after its current message, or by cancellation past ``timeout`` seconds.

        Returns the exit reason. A supervised permanent child stopped this way is restarted by its
        supervisor (as in OTP); use ``Supervisor.terminate_child`` to remove it.
        """
        return await self._cell.stop(timeout)

    async def wait_stopped(self, timeout: float | None) -> ExitReason:  # noqa: ASYNC109
        """Wait until the actor has ended and return its exit reason; ``TimeoutError`` past the deadline."""
        return await self._cell.wait_stopped(timeout)

    def statistics(self) -> ActorStats:
        """A snapshot of the actor's state and counters (a ``SupervisorStats`` for a supervisor)."""
        return self._cell.actor.statistics()


def expire_reply(reply: asyncio.Future[Any], path: str, timeout: float) -> None:
    """Timer callback: fail a pending reply with ``AskTimeout``."""
    if not reply.done():
        reply.set_exception(AskTimeout(f"no reply from {path!r} within {timeout:g}s"))

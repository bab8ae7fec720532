"""A bounded, single-consumer mailbox with a separate system lane.

User messages (``tell`` and ``ask``) go into a FIFO bounded by ``capacity``; a producer that finds it full
either fails at once (:meth:`Mailbox.put_nowait`) or waits, with a deadline, for room (:meth:`Mailbox.put`).
Runtime messages (stop requests, ``Down`` notices, supervisor work) go into the *system lane*, which the
actor drains first. The system lane is not capacity-bounded, but every producer of it is: at most one entry
per monitor, per child exit, per pending supervisor call.

Closing the mailbox (when the actor ends) hands the undelivered user messages back to the caller (so their
pending asks can be failed) and wakes every waiting producer, who then sees :class:`MailboxClosed`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

from actors.errors import MailboxFull

T = TypeVar("T")
S = TypeVar("S")


class MailboxClosed(Exception):
    """Internal: the mailbox is closed (its actor has ended). Refs turn it into ``ActorDead``."""


class Mailbox(Generic[T, S]):
    """Bounded FIFO of user items of type ``T`` plus an unbounded-by-construction system lane of ``S``."""

    __slots__ = ("_capacity", "_closed", "_getter", "_loop", "_putters", "items", "system")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("mailbox capacity must be >= 1")
        self._capacity = capacity
        self.items: deque[T] = deque()
        self.system: deque[S] = deque()
        self._getter: asyncio.Future[None] | None = None
        self._putters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def capacity(self) -> int:
        """The most user items the mailbox holds."""
        return self._capacity

    @property
    def closed(self) -> bool:
        """True once the owning actor has ended."""
        return self._closed

    def __len__(self) -> int:
        return len(self.items)

    def waiting_producers(self) -> int:
        """How many producers wait for room."""
        return len(self._putters)

    # ---- producers -------------------------------------------------------------------------------------

    def put_nowait(self, item: T) -> None:
        """Enqueue ``item`` or raise ``MailboxFull`` / ``MailboxClosed`` at once."""
        if self._closed:
            raise MailboxClosed
        if len(self.items) >= self._capacity or self._putters:
            raise MailboxFull(f"mailbox full ({self._capacity} messages)")
        self.items.append(item)
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)

    async def put(self, item: T, timeout: float | None) -> None:  # noqa: ASYNC109
        """Enqueue ``item``, waiting up to ``timeout`` seconds (``None``: no limit) for room.

        Raises ``MailboxFull`` when the deadline passes first, ``MailboxClosed`` when the actor ends first.
        """
        if self._closed:
            raise MailboxClosed
        if len(self.items) < self._capacity and not self._putters:
            self.put_nowait(item)
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while len(self.items) >= self._capacity:
                    if self._closed:
                        raise MailboxClosed
                    waiter: asyncio.Future[None] = loop.create_future()
                    self._putters.append(waiter)
                    try:
                        await waiter
                    except BaseException:
                        # Cancelled or timed out: pass our turn on so a wake-up is never lost.
                        self._remove_putter(waiter)
                        if not self._closed and len(self.items) < self._capacity:
                            self._wake_putter()
                        raise
                    self._remove_putter(waiter)
        except TimeoutError:
            raise MailboxFull(f"mailbox full ({self._capacity} messages) for {timeout}s") from None
        if self._closed:
            raise MailboxClosed
        self.items.append(item)
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)
        if self._putters and len(self.items) < self._capacity:
            self._wake_putter()

    def put_system(self, item: S) -> bool:
        """Enqueue a runtime message ahead of user messages; False if the mailbox is closed."""
        if self._closed:
            return False
        self.system.append(item)
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)
        return True

    # ---- the consumer ----------------------------------------------------------------------------------

    def pop(self) -> T:
        """Take the oldest user item (the caller checked ``items`` is non-empty) and make room."""
        item = self.items.popleft()
        if self._putters:
            self._wake_putter()
        return item

    async def wait(self) -> None:
        """Wait until a user or system item is available, or the mailbox is closed (consumer only)."""
        if self.items or self.system or self._closed:
            return
        getter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._getter = getter
        try:
            await getter
        finally:
            self._getter = None

    def close(self) -> tuple[list[T], list[S]]:
        """Close for good: return the undelivered user and system items, and wake every waiter."""
        self._closed = True
        left = list(self.items)
        left_system = list(self.system)
        self.items.clear()
        self.system.clear()
        while self._putters:
            _wake(self._putters.popleft())
        if self._getter is not None:
            _wake(self._getter)
        return left, left_system

    # ---- internals -------------------------------------------------------------------------------------

    def _wake_putter(self) -> None:
        while self._putters:
            waiter = self._putters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _remove_putter(self, waiter: asyncio.Future[None]) -> None:
        if waiter in self._putters:
            self._putters.remove(waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)

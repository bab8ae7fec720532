"""Exit reasons and monitoring: how one actor learns that another has died.

An actor ends with an *exit reason*: :data:`NORMAL` (it stopped itself), :data:`SHUTDOWN` (it was stopped
by its owner, its supervisor or the system), or the exception that crashed it. Any actor may
:meth:`~actors.Actor.watch` another; when the watched actor ends, the watcher's ``receive`` gets one
:class:`Down` message carrying that reason. Watching an actor that is already dead delivers the ``Down`` at
once. A monitor fires at most once; it is dropped when either side ends.

Down messages bypass the bounded mailbox (they ride the system queue, which holds at most one message per
monitor), so a dying actor never blocks on a watcher's full mailbox. An actor that watches others should
include ``Down`` in its message type, e.g. ``Actor[Ping | Down]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from actors.ref import ActorRef


@dataclass(frozen=True, slots=True)
class Normal:
    """Exit reason: the actor stopped itself (``stop_self``) and finished cleanly."""

    def __str__(self) -> str:
        return "normal"


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Exit reason: the actor was stopped from outside (its owner, supervisor, or the system)."""

    def __str__(self) -> str:
        return "shutdown"


ExitReason: TypeAlias = Normal | Shutdown | BaseException
"""Why an actor ended: :data:`NORMAL`, :data:`SHUTDOWN`, or the exception that crashed it."""

NORMAL = Normal()
SHUTDOWN = Shutdown()


def is_abnormal(reason: ExitReason) -> bool:
    """True when the reason is a crash (an exception), as opposed to a normal stop or a shutdown."""
    return isinstance(reason, BaseException)


@dataclass(frozen=True, slots=True)
class Down:
    """Delivered to a watcher's ``receive`` when the watched actor ends."""

    ref_name: str
    reason: ExitReason
    ref: ActorRef[Any] | None = field(default=None, compare=False, repr=False)

    @property
    def abnormal(self) -> bool:
        """True when the watched actor crashed."""
        return is_abnormal(self.reason)

"""The exceptions the actor runtime raises.

Every error the runtime raises derives from :class:`ActorError`, so a caller can catch the whole family at
once. Handler exceptions raised inside an actor's ``receive`` during an ``ask`` are not wrapped: the caller
gets the very exception the handler raised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actors.monitor import ExitReason


class ActorError(Exception):
    """Base class of every error raised by the actor runtime."""


class ActorDead(ActorError):
    """The target actor is not running: it stopped, crashed, or was never started.

    ``reason`` is the actor's exit reason when it is known (``Normal``, ``Shutdown`` or the exception that
    crashed it), else ``None``.
    """

    def __init__(self, name: str, reason: ExitReason | None = None, detail: str = "") -> None:
        self.name = name
        self.reason = reason
        text = f"actor {name!r} is dead"
        if reason is not None:
            text += f" (reason: {_describe(reason)})"
        if detail:
            text += f": {detail}"
        super().__init__(text)


class AskTimeout(ActorError, TimeoutError):
    """An ``ask`` got no reply before its deadline (the request may or may not have been handled)."""


class MailboxFull(ActorError):
    """A ``tell`` found the target's bounded mailbox full and no room appeared before its deadline."""


class StartFailed(ActorError):
    """An actor's ``on_start`` raised or did not finish in time; ``__cause__`` holds the original error."""

    def __init__(self, name: str, detail: str = "") -> None:
        self.name = name
        super().__init__(f"actor {name!r} failed to start" + (f": {detail}" if detail else ""))


class RestartIntensityExceeded(ActorError):
    """A supervisor saw more restarts than its intensity allows and gave up; its parent decides next."""

    def __init__(self, supervisor: str, child: str, max_restarts: int, period_s: float) -> None:
        self.supervisor = supervisor
        self.child = child
        super().__init__(
            f"supervisor {supervisor!r} exceeded {max_restarts} restarts in {period_s:g}s (last: child {child!r})"
        )


def _describe(reason: ExitReason) -> str:
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}"
    return type(reason).__name__.lower()

"""Restart intensity: Erlang/OTP's "at most N restarts within T seconds", as pure logic.

Nothing here reads a clock or touches asyncio: the caller passes the current time in. A supervisor owns one
:class:`RestartIntensity` and feeds it the readings of its injected clock, so the rule can be tested
exhaustively (with hypothesis) and without sleeping.

The rule, as in OTP: a restart at time ``now`` is allowed when the restarts inside the window
``(now - period_s, now]``, this one included, number at most ``max_restarts``. With ``max_restarts == 0``
no restart is ever allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def restart_allowed(
    history: Sequence[float], now: float, *, max_restarts: int, period_s: float
) -> tuple[tuple[float, ...], bool]:
    """Record a restart at ``now`` against ``history`` (earlier restart times).

    Returns the new history, trimmed to the restarts still inside the window, and whether this restart is
    within the intensity. The history never holds more than ``max_restarts + 1`` entries.
    """
    if max_restarts < 0:
        raise ValueError("max_restarts must be >= 0")
    if period_s <= 0:
        raise ValueError("period_s must be > 0")
    threshold = now - period_s
    recent = tuple(t for t in history if t > threshold)
    recent = (*recent, now)[-(max_restarts + 1) :]
    return recent, len(recent) <= max_restarts


@dataclass(slots=True)
class RestartIntensity:
    """A supervisor's restart budget: call :meth:`record` once per restart with the current time."""

    max_restarts: int
    period_s: float
    history: tuple[float, ...] = ()
    total: int = 0
    exceeded: bool = field(default=False)

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")
        if self.period_s <= 0:
            raise ValueError("period_s must be > 0")

    def record(self, now: float) -> bool:
        """Count a restart at ``now``; return False when it exceeds the intensity (escalate)."""
        self.history, allowed = restart_allowed(
            self.history, now, max_restarts=self.max_restarts, period_s=self.period_s
        )
        self.total += 1
        if not allowed:
            self.exceeded = True
        return allowed

    def recent(self, now: float) -> int:
        """How many recorded restarts lie inside the window ending at ``now``."""
        return sum(1 for t in self.history if t > now - self.period_s)

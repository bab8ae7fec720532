"""Supervisor: an actor that starts, watches and restarts child actors, with Erlang/OTP semantics.

- **Strategies.** ``ONE_FOR_ONE`` restarts only the child that ended; ``ONE_FOR_ALL`` stops every other
  running child (in reverse order) and restarts them all (in order); ``REST_FOR_ONE`` does that for the
  children started after the one that ended.
- **Restart types.** ``PERMANENT`` children are always restarted; ``TRANSIENT`` ones only after a crash
  (not after ``Normal`` or ``Shutdown``); ``TEMPORARY`` ones never (and are forgotten when they end, or when a
  sibling's restart stops them).
- **Intensity.** At most ``max_restarts`` restarts within ``period_s`` seconds, measured on the injected
  ``clock`` (see :mod:`actors.intensity`). One more and the supervisor gives up: it crashes with
  ``RestartIntensityExceeded``, which stops its children in reverse order and reports to its own parent.
  A restart whose ``on_start`` fails counts as another restart and is retried, within the same budget.
- **Order.** Children start in list order, each only after the previous one's ``on_start`` succeeded; they
  stop in reverse order, each within its ``shutdown_timeout`` (then it is cancelled). If a child fails to
  start when the supervisor starts, the ones already started are stopped and the supervisor's own start
  fails.
- **Nesting and dynamic children.** A supervisor is an actor, so ``ChildSpec(name, factory=lambda:
  Supervisor(...))`` nests one. ``start_child`` / ``terminate_child`` add and remove children at run time.

All of the supervisor's bookkeeping runs on its own task (public methods hop onto it), so restarts, child
exits and dynamic changes never interleave.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Never

from actors.actor import Actor
from actors.cell import Cell
from actors.errors import RestartIntensityExceeded, StartFailed
from actors.intensity import RestartIntensity
from actors.monitor import ExitReason, Normal, Shutdown, is_abnormal
from actors.ref import ActorRef
from actors.stats import ActorStats

log = logging.getLogger("actors")

CALL_MARGIN_S = 5.0
"""Extra time a public supervisor call allows beyond the child's own start or shutdown timeout."""


class Strategy(enum.Enum):
    """Which children a supervisor restarts when one ends abnormally."""

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


class Restart(enum.Enum):
    """When a child is restarted."""

    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


def should_restart(restart: Restart, reason: ExitReason) -> bool:
    """OTP's rule: permanent always, transient after a crash only, temporary never."""
    if restart is Restart.PERMANENT:
        return True
    if restart is Restart.TRANSIENT:
        return is_abnormal(reason)
    return False


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """How to make and manage one child. ``factory`` returns a fresh actor for every (re)start."""

    name: str
    factory: Callable[[], Actor[Any]]
    restart: Restart = Restart.PERMANENT
    shutdown_timeout: float = 5.0
    mailbox_size: int | None = None
    start_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"invalid child name {self.name!r}")


@dataclass(frozen=True, slots=True)
class ChildInfo:
    """One row of ``which_children``: the child's name, current ref (None when not running) and type."""

    name: str
    ref: ActorRef[Any] | None
    restart: Restart


@dataclass(frozen=True, slots=True)
class ChildStats:
    """A child as its supervisor sees it."""

    name: str
    restart: Restart
    running: bool
    restarts: int
    last_exit: str | None
    actor: ActorStats | None


@dataclass(frozen=True, slots=True)
class SupervisorStats(ActorStats):
    """A supervisor's health: its own actor stats plus its strategy, restart budget and children."""

    strategy: Strategy
    max_restarts: int
    period_s: float
    child_restarts: int
    recent_restarts: int
    children: tuple[ChildStats, ...]


class _Child:
    __slots__ = ("cell", "last_exit", "restarts", "spec")

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.cell: Cell[Any] | None = None
        self.restarts = 0
        self.last_exit: ExitReason | None = None


class Supervisor(Actor[Never]):
    """Starts children in order, restarts them by strategy, stops them in reverse. Takes no messages."""

    mailbox_size: ClassVar[int] = 1

    def __init__(  # noqa: PLR0917 (the documented constructor signature)
        self,
        name: str,
        children: Sequence[ChildSpec] = (),
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        max_restarts: int = 3,
        period_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_unique(spec.name for spec in children)
        self._sup_name = name
        self._strategy = strategy
        self._intensity = RestartIntensity(max_restarts, period_s)
        self._clock = clock
        self._children = [_Child(spec) for spec in children]

    def default_name(self) -> str:
        return self._sup_name

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def on_start(self) -> None:
        """Start every child in order; on a failure stop those already started and fail."""
        started: list[_Child] = []
        for child in list(self._children):
            try:
                await self._start(child)
            except BaseException:
                await self._stop_children(reversed(started))
                raise
            started.append(child)

    async def on_stop(self) -> None:
        """Stop the running children in reverse order."""
        await self._stop_children(reversed(self._children))

    async def receive(self, message: Never) -> Any:
        raise TypeError(f"supervisor {self.path} takes no messages, got {message!r}")

    # ---- public API (hops onto the supervisor's task) ----------------------------------------------------

    async def start_child(self, spec: ChildSpec, *, timeout: float | None = None) -> ActorRef[Any]:  # noqa: ASYNC109
        """Add a child at the end of the list and start it; return its ref.

        Raises ``ValueError`` for a duplicate name and ``StartFailed`` if it does not start (it is then not
        added).
        """
        wait = spec.start_timeout + CALL_MARGIN_S if timeout is None else timeout
        return await self._require_cell().call(lambda: self._add(spec), wait)

    async def terminate_child(self, name: str, timeout: float | None = None) -> ExitReason | None:  # noqa: ASYNC109
        """Stop child ``name`` (within ``timeout``, default its spec's) and remove it; return its exit reason.

        Raises ``KeyError`` for an unknown name.
        """
        child = self._find_name(name)
        stop_s = child.spec.shutdown_timeout if timeout is None else timeout
        return await self._require_cell().call(lambda: self._remove(name, stop_s), stop_s + CALL_MARGIN_S)

    async def wait_idle(self, timeout: float) -> None:  # noqa: ASYNC109
        """Return once the supervisor has handled everything queued before this call: child exits (and
        the restarts they cause) and dynamic changes. Raises ``ActorDead`` if the supervisor ends first."""

        async def nothing() -> None:
            return None

        await self._require_cell().call(nothing, timeout)

    def which_children(self) -> list[ChildInfo]:
        """The children in start order, with their current refs."""
        return [ChildInfo(c.spec.name, None if c.cell is None else c.cell.ref, c.spec.restart) for c in self._children]

    def child_ref(self, name: str) -> ActorRef[Any] | None:
        """The current incarnation of child ``name``; None while it is not running or not a child."""
        for c in self._children:
            if c.spec.name == name:
                return None if c.cell is None else c.cell.ref
        return None

    def statistics(self) -> SupervisorStats:
        """The supervisor's own stats plus its restart budget and every child's stats."""
        base = super().statistics()
        now = self._clock()
        children = tuple(
            ChildStats(
                name=c.spec.name,
                restart=c.spec.restart,
                running=c.cell is not None,
                restarts=c.restarts,
                last_exit=None if c.last_exit is None else _describe(c.last_exit),
                actor=None if c.cell is None else c.cell.actor.statistics(),
            )
            for c in self._children
        )
        return SupervisorStats(
            **{f.name: getattr(base, f.name) for f in fields(ActorStats)},
            strategy=self._strategy,
            max_restarts=self._intensity.max_restarts,
            period_s=self._intensity.period_s,
            child_restarts=sum(c.restarts for c in self._children),
            recent_restarts=self._intensity.recent(now),
            children=children,
        )

    # ---- on the supervisor's task ----------------------------------------------------------------------

    async def _add(self, spec: ChildSpec) -> ActorRef[Any]:
        _check_unique([*(c.spec.name for c in self._children), spec.name])
        child = _Child(spec)
        self._children.append(child)
        try:
            await self._start(child)
        except BaseException:
            self._children.remove(child)
            raise
        assert child.cell is not None
        return child.cell.ref

    async def _remove(self, name: str, timeout: float) -> ExitReason | None:  # noqa: ASYNC109
        child = self._find_name(name)
        self._children.remove(child)
        cell, child.cell = child.cell, None
        if cell is None:
            return child.last_exit
        return await cell.stop(timeout)

    async def _start(self, child: _Child) -> None:
        spec = child.spec
        me = self._require_cell()
        try:
            actor = spec.factory()
        except Exception as exc:
            raise StartFailed(f"{me.path}/{spec.name}", f"factory raised {exc!r}") from exc
        cell: Cell[Any] = Cell(
            actor,
            name=spec.name,
            path=f"{me.path}/{spec.name}",
            capacity=spec.mailbox_size or actor.mailbox_size,
            on_exit=self._child_exited,
            restarts=child.restarts,
            shutdown_timeout=spec.shutdown_timeout,
        )
        await cell.start(spec.start_timeout)
        assert cell.task is not None
        me.adopt(cell.task)
        child.cell = cell

    async def _stop_children(self, children: Iterable[_Child]) -> None:
        for child in list(children):
            cell, child.cell = child.cell, None
            if cell is not None:
                reason = await cell.stop(child.spec.shutdown_timeout)
                child.last_exit = reason

    def _child_exited(self, cell: Cell[Any], reason: ExitReason) -> None:
        # Runs synchronously in the child's task as it ends: hop onto our own task.
        me = self._cell
        if me is not None:
            me.post(lambda: self._on_child_exit(cell, reason))

    async def _on_child_exit(self, cell: Cell[Any], reason: ExitReason) -> None:
        child = next((c for c in self._children if c.cell is cell), None)
        if child is None:
            return  # we stopped it ourselves, or it was already replaced
        child.cell = None
        child.last_exit = reason
        if not should_restart(child.spec.restart, reason):
            if child.spec.restart is Restart.TEMPORARY:
                self._children.remove(child)
            return
        log.warning("supervisor %s: child %s ended (%s); restarting", self.path, cell.name, _describe(reason))
        await self._restart(child)

    async def _restart(self, failed: _Child) -> None:
        self._check_intensity(failed)
        index = self._children.index(failed)
        if self._strategy is Strategy.ONE_FOR_ONE:
            group = [failed]
        elif self._strategy is Strategy.ONE_FOR_ALL:
            group = [c for c in self._children if c is failed or c.cell is not None]
        else:
            group = [failed, *(c for c in self._children[index + 1 :] if c.cell is not None)]
        await self._stop_children(reversed(group))
        for c in group:
            if c is not failed and c.spec.restart is Restart.TEMPORARY:
                self._children.remove(c)
        group = [c for c in group if c is failed or c.spec.restart is not Restart.TEMPORARY]
        while True:
            started: list[_Child] = []
            try:
                for c in group:
                    c.restarts += 1
                    await self._start(c)
                    started.append(c)
                return
            except StartFailed as exc:
                log.error("supervisor %s: restart of %s failed", self.path, failed.spec.name, exc_info=exc)
                await self._stop_children(reversed(started))
                self._check_intensity(failed, exc)

    def _check_intensity(self, child: _Child, cause: BaseException | None = None) -> None:
        if not self._intensity.record(self._clock()):
            reason = child.last_exit
            exc = RestartIntensityExceeded(
                self.path, child.spec.name, self._intensity.max_restarts, self._intensity.period_s
            )
            raise exc from (cause if cause is not None else reason if isinstance(reason, BaseException) else None)

    def _find_name(self, name: str) -> _Child:
        for c in self._children:
            if c.spec.name == name:
                return c
        raise KeyError(f"supervisor {self._sup_name!r} has no child {name!r}")


def _check_unique(names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"duplicate child name {name!r}")
        seen.add(name)


def _describe(reason: ExitReason) -> str:
    if isinstance(reason, Normal | Shutdown):
        return str(reason)
    return repr(reason)

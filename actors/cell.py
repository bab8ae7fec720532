"""The running incarnation of an actor: its task, mailbox, lifecycle and links.

A :class:`Cell` is the runtime half of an actor (the :class:`~actors.Actor` subclass is the user half). It
owns exactly one asyncio task, which runs the whole life of one incarnation:

1. ``on_start``; the spawner's ``start`` returns only once it succeeded (or raises ``StartFailed``);
2. the message loop: system lane first (stop requests, ``Down`` notices, supervisor work), then user
   messages one at a time. An exception from an ``ask`` goes back to the asker and the loop goes on; any
   other exception (a ``tell`` handler, a ``Down`` handler, a crashed owned task) ends the loop;
3. ``on_failure(exc)`` after a crash, then ``on_stop`` always, then the owned background tasks are cancelled
   and awaited;
4. finalisation, synchronous so it cannot be interrupted: the mailbox closes, every pending ``ask`` fails with
   ``ActorDead``, watchers get ``Down``, and the owner (supervisor or system) is told through its exit
   callback.

Stopping is cooperative first (a stop request is handled after the current message), then forced: past the
shutdown timeout the task is cancelled. Nothing here sleeps; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from actors.errors import ActorDead, StartFailed
from actors.mailbox import Mailbox
from actors.monitor import SHUTDOWN, Down, ExitReason, is_abnormal
from actors.ref import ActorRef, expire_reply
from actors.stats import ActorState, ActorStats

if TYPE_CHECKING:
    from actors.actor import Actor

M = TypeVar("M")
T = TypeVar("T")

log = logging.getLogger("actors")

KILL_GRACE_S = 1.0
"""How long a cancelled (killed) actor gets to finish its own clean-up."""

Envelope = tuple[Any, "asyncio.Future[Any] | None"]
"""A user message and, for an ``ask``, the future that carries the reply."""

ExitCallback = Callable[["Cell[Any]", ExitReason], None]
"""Called synchronously by a started cell when it ends: how an owner learns of its children's exits."""


class _Stop:
    __slots__ = ("reason",)

    def __init__(self, reason: ExitReason) -> None:
        self.reason = reason


class _Crash:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Call:
    __slots__ = ("fn", "reply")

    def __init__(self, fn: Callable[[], Awaitable[Any]], reply: asyncio.Future[Any] | None) -> None:
        self.fn = fn
        self.reply = reply


SystemMessage = _Stop | _Crash | _Call | Down


class Cell(Generic[M]):
    """One running incarnation of an actor. Internal: users hold an :class:`ActorRef`."""

    def __init__(
        self,
        actor: Actor[M],
        *,
        name: str,
        path: str,
        capacity: int,
        on_exit: ExitCallback | None,
        restarts: int = 0,
        shutdown_timeout: float = 5.0,
    ) -> None:
        self.actor = actor
        self.name = name
        self.path = path
        self.mailbox: Mailbox[Envelope, SystemMessage] = Mailbox(capacity)
        self.ref: ActorRef[M] = ActorRef(self)
        self.restarts = restarts
        self.shutdown_timeout = shutdown_timeout
        self.state = ActorState.NEW
        self.exit_reason: ExitReason | None = None
        self.task: asyncio.Task[None] | None = None
        self.processed = 0
        self.ask_errors = 0
        self.asks_dropped = 0
        self._on_exit = on_exit
        self._started: asyncio.Future[bool] | None = None
        self._was_running = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watchers: dict[Cell[Any], None] = {}
        self._watching: dict[Cell[Any], None] = {}
        self._current: asyncio.Future[Any] | None = None
        self._in_user = False
        self._interrupt: BaseException | None = None
        self._interrupt_cancelled = False
        self._late_failure: BaseException | None = None
        self._killing = False

    def __repr__(self) -> str:
        return f"<Cell {self.path} {self.state.value}>"

    # ---- start -----------------------------------------------------------------------------------------

    async def start(self, timeout: float) -> None:  # noqa: ASYNC109
        """Run ``on_start`` in the actor's own task; return once it succeeded.

        Raises ``StartFailed`` (``__cause__``: the error, or ``TimeoutError`` past ``timeout``). On failure
        the actor's task has ended before this returns.
        """
        if self.task is not None:
            raise RuntimeError(f"{self.path} was already started")
        loop = asyncio.get_running_loop()
        started: asyncio.Future[bool] = loop.create_future()
        self._started = started
        self.actor._attach(self)
        self.state = ActorState.STARTING
        self.task = loop.create_task(self._run(), name=f"actor:{self.path}")
        try:
            await asyncio.wait((started,), timeout=timeout)
        except asyncio.CancelledError:
            await self.kill()
            raise
        if not started.done():
            await self.kill()
            raise StartFailed(self.path, f"on_start took longer than {timeout:g}s") from TimeoutError()
        if not started.result():
            await self._wait_task(self.shutdown_timeout + KILL_GRACE_S)
            reason = self.exit_reason
            cause = reason if isinstance(reason, BaseException) else None
            raise StartFailed(self.path, "" if cause is None else repr(cause)) from cause

    # ---- the task --------------------------------------------------------------------------------------

    async def _run(self) -> None:
        reason: ExitReason = SHUTDOWN
        try:
            try:
                self._in_user = True
                await self.actor.on_start()
            except asyncio.CancelledError as exc:
                reason = self._crash_from_cancel(exc)
                await self._reap_tasks(self.shutdown_timeout)
                return
            except Exception as exc:
                reason = exc
                await self._reap_tasks(self.shutdown_timeout)
                return
            finally:
                self._in_user = False
            if self._interrupt is not None:
                # An owned task crashed during on_start and its cancel was swallowed.
                reason = self._take_interrupt()
                await self._reap_tasks(self.shutdown_timeout)
                return
            self.state = ActorState.RUNNING
            self._was_running = True
            assert self._started is not None
            self._started.set_result(True)
            try:
                reason = await self._loop()
            except asyncio.CancelledError as exc:
                reason = self._crash_from_cancel(exc)
            except Exception as exc:
                reason = exc
                if self._interrupt_cancelled:
                    self._take_interrupt()
            finally:
                self._in_user = False
                self._current_fail(reason)
            reason = await self._shutdown(reason)
        except asyncio.CancelledError:
            # Killed: the shutdown timeout passed, or the event loop is closing.
            if not is_abnormal(reason):
                reason = SHUTDOWN
            await self._reap_tasks(KILL_GRACE_S)
        except BaseException as exc:  # KeyboardInterrupt / SystemExit: record, then let through
            reason = exc
            raise
        finally:
            self._finalize(reason)

    def _crash_from_cancel(self, exc: asyncio.CancelledError) -> BaseException:
        """Turn a CancelledError seen by the actor's task into a crash reason, or re-raise a real kill."""
        if self._interrupt_cancelled and not self._killing:
            return self._take_interrupt()
        assert self.task is not None
        if self.task.cancelling() == 0:
            return exc  # user code raised CancelledError without the actor being cancelled: a crash
        raise exc

    def _take_interrupt(self) -> BaseException:
        exc = self._interrupt
        assert exc is not None and self.task is not None
        if self._interrupt_cancelled:
            self._interrupt_cancelled = False
            self.task.uncancel()
        return exc

    async def _loop(self) -> ExitReason:
        mb = self.mailbox
        items = mb.items
        system = mb.system
        receive = self.actor.receive
        while True:
            if system:
                stop = await self._system(system.popleft())
                if stop is not None:
                    return stop
                continue
            if self._interrupt is not None:
                raise self._take_interrupt()
            if not items:
                await mb.wait()
                continue
            message, reply = mb.pop()
            if reply is None:
                self._in_user = True
                await receive(message)
                self._in_user = False
            elif reply.done():
                self.asks_dropped += 1  # the asker gave up before we got to it
                continue
            else:
                self._current = reply
                self._in_user = True
                try:
                    result = await receive(message)
                except Exception as exc:
                    self._in_user = False
                    self.ask_errors += 1
                    if not reply.done():
                        reply.set_exception(exc)
                    else:
                        log.warning("%s: ask handler failed after its caller left", self.path, exc_info=exc)
                else:
                    self._in_user = False
                    if not reply.done():
                        reply.set_result(result)
                self._current = None
            self.processed += 1

    async def _system(self, msg: SystemMessage) -> ExitReason | None:
        if isinstance(msg, _Stop):
            return msg.reason
        if isinstance(msg, _Crash):
            raise self._take_interrupt()
        if isinstance(msg, Down):
            self._in_user = True
            await self.actor.receive(cast(M, msg))
            self._in_user = False
            return None
        reply = msg.reply
        if reply is None:
            await msg.fn()
        elif not reply.done():
            try:
                result = await msg.fn()
            except Exception as exc:
                if not reply.done():
                    reply.set_exception(exc)
            else:
                if not reply.done():
                    reply.set_result(result)
        return None

    async def _shutdown(self, reason: ExitReason) -> ExitReason:
        self.state = ActorState.STOPPING
        if isinstance(reason, BaseException):
            log.error("actor %s crashed: %r", self.path, reason, exc_info=reason)
            try:
                await self.actor.on_failure(reason)
            except Exception as exc:
                log.error("actor %s: on_failure raised", self.path, exc_info=exc)
                reason.add_note(f"on_failure raised {exc!r}")
        try:
            await self.actor.on_stop()
        except Exception as exc:
            if isinstance(reason, BaseException):
                log.error("actor %s: on_stop raised", self.path, exc_info=exc)
                reason.add_note(f"on_stop raised {exc!r}")
            else:
                log.error("actor %s: on_stop raised", self.path, exc_info=exc)
                reason = exc
        await self._reap_tasks(self.shutdown_timeout)
        if self._late_failure is not None and not is_abnormal(reason):
            reason = self._late_failure
        return reason

    async def _reap_tasks(self, timeout: float) -> None:  # noqa: ASYNC109
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                log.error("actor %s: task %s ignored cancellation for %gs", self.path, t.get_name(), timeout)

    def _current_fail(self, reason: ExitReason) -> None:
        reply = self._current
        self._current = None
        if reply is not None and not reply.done():
            reply.set_exception(ActorDead(self.path, reason, "it died while handling this ask"))

    def _finalize(self, reason: ExitReason) -> None:
        self.exit_reason = reason
        self.state = ActorState.FAILED if is_abnormal(reason) else ActorState.STOPPED
        if self._started is not None and not self._started.done():
            self._started.set_result(False)
        self._current_fail(reason)
        left, left_system = self.mailbox.close()
        for _, reply in left:
            if reply is not None and not reply.done():
                reply.set_exception(ActorDead(self.path, reason, "it died before handling this ask"))
        for msg in left_system:
            if isinstance(msg, _Call) and msg.reply is not None and not msg.reply.done():
                msg.reply.set_exception(ActorDead(self.path, reason, "it died before handling this call"))
        for target in self._watching:
            target._watchers.pop(self, None)
        self._watching.clear()
        watchers = list(self._watchers)
        self._watchers.clear()
        for watcher in watchers:
            watcher._watching.pop(self, None)
            watcher.mailbox.put_system(Down(self.name, reason, self.ref))
        if self._was_running and self._on_exit is not None:
            self._on_exit(self, reason)

    # ---- control from outside --------------------------------------------------------------------------

    def request_stop(self, reason: ExitReason = SHUTDOWN) -> None:
        """Ask the actor to stop after its current message (no effect once it has ended)."""
        self.mailbox.put_system(_Stop(reason))

    async def stop(self, timeout: float) -> ExitReason | None:  # noqa: ASYNC109
        """Stop gracefully within ``timeout`` seconds, else kill; return the exit reason.

        Called from the actor's own task, it only requests the stop (the actor cannot wait for itself).
        """
        task = self.task
        if task is None:
            return None
        if task is asyncio.current_task():
            self.request_stop(SHUTDOWN)
            return None
        if not task.done():
            self.request_stop(SHUTDOWN)
            await asyncio.wait((task,), timeout=timeout)
            if not task.done():
                log.warning("actor %s did not stop within %gs; cancelling it", self.path, timeout)
                await self.kill()
        return self.exit_reason

    async def kill(self) -> None:
        """Cancel the actor's task and wait (briefly) for it to end."""
        task = self.task
        if task is None or task.done():
            return
        self._killing = True
        task.cancel()
        await asyncio.wait((task,), timeout=KILL_GRACE_S + self.shutdown_timeout)
        if not task.done():
            log.error("actor %s ignored cancellation; its task is left running", self.path)

    async def wait_stopped(self, timeout: float | None) -> ExitReason:  # noqa: ASYNC109
        """Wait until the actor has ended; return its exit reason. Raises ``TimeoutError``."""
        task = self.task
        if task is None:
            raise ActorDead(self.path, None, "it was never started")
        if task is asyncio.current_task():
            raise RuntimeError(f"actor {self.path} cannot wait for its own end")
        if not task.done():
            await asyncio.wait((task,), timeout=timeout)
            if not task.done():
                raise TimeoutError(f"actor {self.path} still running after {timeout}s")
        assert self.exit_reason is not None
        return self.exit_reason

    async def _wait_task(self, timeout: float) -> None:  # noqa: ASYNC109
        task = self.task
        if task is not None and not task.done():
            await asyncio.wait((task,), timeout=timeout)

    def crash(self, exc: BaseException) -> None:
        """Crash the actor with ``exc`` (an owned task failed). Interrupts the handler that is running."""
        if self.state in (ActorState.STOPPING, ActorState.STOPPED, ActorState.FAILED):
            log.error("actor %s: owned task failed while stopping", self.path, exc_info=exc)
            if self._late_failure is None:
                self._late_failure = exc
            return
        if self._interrupt is not None:
            log.error("actor %s: another owned task failed", self.path, exc_info=exc)
            return
        self._interrupt = exc
        task = self.task
        if self._in_user and task is not None and not task.done() and task is not asyncio.current_task():
            self._interrupt_cancelled = True
            task.cancel()
        else:
            self.mailbox.put_system(_Crash(exc))

    def post(self, fn: Callable[[], Awaitable[Any]]) -> bool:
        """Run ``fn`` on the actor's task, ahead of user messages; an exception crashes the actor."""
        return self.mailbox.put_system(_Call(fn, None))

    async def call(self, fn: Callable[[], Awaitable[T]], timeout: float) -> T:  # noqa: ASYNC109
        """Run ``fn`` on the actor's task and return its result (its exception goes back to the caller)."""
        if self.task is not None and self.task is asyncio.current_task():
            return await fn()
        if self.task is None:
            raise ActorDead(self.path, None, "it was never started")
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[T] = loop.create_future()
        if not self.mailbox.put_system(_Call(fn, reply)):
            raise ActorDead(self.path, self.exit_reason)
        handle = loop.call_later(timeout, expire_reply, reply, self.path, timeout)
        try:
            return await reply
        finally:
            handle.cancel()

    # ---- owned tasks and monitors ----------------------------------------------------------------------

    def start_task(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Start a background task owned by this actor (see ``Actor.start_task``)."""
        if self.state not in (ActorState.STARTING, ActorState.RUNNING):
            coro.close()
            raise ActorDead(self.path, self.exit_reason, f"cannot start task {name!r}")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.path}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def adopt(self, task: asyncio.Task[Any]) -> None:
        """Own another actor's task: if this actor is killed, that task is cancelled and awaited too."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.crash(exc)

    def watch(self, target: Cell[Any]) -> None:
        """Deliver ``Down`` to this actor when ``target`` ends (at once if it already has)."""
        if target is self:
            raise ValueError("an actor cannot watch itself")
        if self.mailbox.closed:
            raise ActorDead(self.path, self.exit_reason, "a dead actor cannot watch")
        if target.exit_reason is not None:
            self.mailbox.put_system(Down(target.name, target.exit_reason, target.ref))
            return
        if target.task is None:
            raise ActorDead(target.path, None, "it was never started")
        target._watchers[self] = None
        self._watching[target] = None

    def unwatch(self, target: Cell[Any]) -> None:
        """Cancel a monitor (a ``Down`` already queued is not withdrawn)."""
        target._watchers.pop(self, None)
        self._watching.pop(target, None)

    def statistics(self) -> ActorStats:
        """A snapshot of this incarnation."""
        reason = self.exit_reason
        return ActorStats(
            name=self.name,
            path=self.path,
            state=self.state,
            mailbox_depth=len(self.mailbox),
            mailbox_size=self.mailbox.capacity,
            waiting_senders=self.mailbox.waiting_producers(),
            processed=self.processed,
            ask_errors=self.ask_errors,
            asks_dropped=self.asks_dropped,
            tasks=len(self._tasks),
            restarts=self.restarts,
            exit_reason=None if reason is None else repr(reason) if is_abnormal(reason) else str(reason),
        )

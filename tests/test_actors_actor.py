"""Actor, ActorRef and ActorSystem: messages, asks, mailboxes, lifecycle, owned tasks, monitors."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_actors_helpers import (
    DEADLINE,
    Add,
    Block,
    Boom,
    Crash,
    Exit,
    Get,
    Journal,
    Ping,
    Script,
    Worker,
    loop_guard,
    started,
)

from actors import (
    NORMAL,
    SHUTDOWN,
    Actor,
    ActorDead,
    ActorState,
    ActorSystem,
    AskTimeout,
    Down,
    MailboxFull,
    Normal,
    Shutdown,
    StartFailed,
)


@pytest.fixture(autouse=True)
async def guard() -> AsyncIterator[None]:
    async with loop_guard():
        yield


@pytest.fixture
async def system() -> AsyncIterator[ActorSystem]:
    async with ActorSystem("test") as sys_:
        yield sys_


@pytest.fixture
def journal() -> Journal:
    return Journal()


# ---- the guard itself ---------------------------------------------------------------------------------


async def test_loop_guard_catches_never_retrieved_task_exceptions() -> None:
    """The guard works: a task whose exception nobody retrieves is reported to the loop's handler."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    try:

        async def fail() -> None:
            raise Boom("nobody looks")

        task = loop.create_task(fail())
        await asyncio.wait((task,), timeout=DEADLINE)
        del task
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert any("never retrieved" in str(ctx.get("message")) for ctx in seen)


# ---- tell and ask ----------------------------------------------------------------------------------------


async def test_tell_then_ask_in_order(system: ActorSystem, journal: Journal) -> None:
    ref = await system.spawn(Worker("w", journal), name="w")
    for i in range(10):
        await ref.tell(Add(i))
    ref.tell_nowait(Add(100))
    assert await ref.ask(Get(), timeout=DEADLINE) == sum(range(10)) + 100
    stats = ref.statistics()
    assert stats.processed == 12
    assert stats.state is ActorState.RUNNING
    assert stats.name == "w" and stats.path == "test/w"


async def test_ask_exception_goes_back_and_actor_goes_on(system: ActorSystem, journal: Journal) -> None:
    ref = await system.spawn(Worker("w", journal), name="w")
    with pytest.raises(Boom, match="oops"):
        await ref.ask(Crash("oops"), timeout=DEADLINE)
    assert ref.is_alive()
    assert await ref.ask(Ping(), timeout=DEADLINE) == "w"
    assert ref.statistics().ask_errors == 1
    assert "w.failure:Boom" not in journal.events


async def test_tell_exception_crashes_actor(system: ActorSystem, journal: Journal) -> None:
    ref = await system.spawn(Worker("w", journal), name="w")
    await ref.tell(Crash("bad"))
    reason = await ref.wait_stopped(DEADLINE)
    assert isinstance(reason, Boom)
    assert not ref.is_alive()
    # on_failure runs before on_stop
    assert journal.events[-2:] == ["w.failure:Boom", "w.stop"]
    assert ref.statistics().state is ActorState.FAILED
    failure = await system.wait_failed(DEADLINE)
    assert failure.name == "w" and failure.reason is reason
    with pytest.raises(ActorDead) as info:
        await ref.tell(Ping())
    assert info.value.reason is reason
    with pytest.raises(ActorDead):
        ref.tell_nowait(Ping())
    with pytest.raises(ActorDead):
        await ref.ask(Ping(), timeout=DEADLINE)


async def test_ask_timeout_and_late_request_is_dropped(system: ActorSystem, journal: Journal) -> None:
    ref = await system.spawn(Worker("w", journal), name="w")
    gate = asyncio.Event()
    blocked = asyncio.create_task(ref.ask(Block(gate), timeout=DEADLINE))
    await journal.wait_event("w.blocked")
    with pytest.raises(AskTimeout):
        await ref.ask(Add(1), timeout=0.01)  # queued behind the blocked handler; its caller gives up
    gate.set()
    assert await blocked == "released"
    assert await ref.ask(Get(), timeout=DEADLINE) == 0  # the abandoned Add(1) was never handled
    assert ref.statistics().asks_dropped == 1
    assert isinstance(AskTimeout("x"), TimeoutError)


async def test_handler_timeout_error_is_not_mistaken_for_ask_timeout(system: ActorSystem) -> None:
    class Slowpoke(Actor[int]):
        async def receive(self, message: int) -> None:
            raise TimeoutError("inner deadline")

    ref = await system.spawn(Slowpoke())
    with pytest.raises(TimeoutError, match="inner deadline") as info:
        await ref.ask(1, timeout=DEADLINE)
    assert not isinstance(info.value, AskTimeout)


async def test_actor_cannot_ask_itself(system: ActorSystem) -> None:
    class Narcissus(Actor[str]):
        async def receive(self, message: str) -> Any:
            if message == "self":
                return await self.ref.ask("inner", timeout=DEADLINE)
            return "inner"

    ref = await system.spawn(Narcissus())
    with pytest.raises(RuntimeError, match="cannot ask itself"):
        await ref.ask("self", timeout=DEADLINE)


# ---- asks pending on a dying actor ---------------------------------------------------------------------


class Doomed(Worker):
    """A worker whose owned background task raises when ``trigger`` is set."""

    def __init__(self, journal: Journal, trigger: asyncio.Event) -> None:
        super().__init__("d", journal)
        self.trigger = trigger

    async def on_start(self) -> None:
        await super().on_start()
        self.start_task(self._bomb(), name="bomb")

    async def _bomb(self) -> None:
        await self.trigger.wait()
        raise Boom("background task died")


async def test_pending_asks_fail_when_actor_crashes(system: ActorSystem, journal: Journal) -> None:
    trigger = asyncio.Event()
    ref = await system.spawn(Doomed(journal, trigger), name="d")
    in_flight = asyncio.create_task(ref.ask(Block(asyncio.Event()), timeout=DEADLINE))
    await journal.wait_event("d.blocked")
    queued = [asyncio.create_task(ref.ask(Get(), timeout=DEADLINE)) for _ in range(3)]
    waiting_tell = asyncio.create_task(ref.tell(Ping()))
    trigger.set()  # the owned task crashes: the running handler is interrupted
    reason = await ref.wait_stopped(DEADLINE)
    assert isinstance(reason, Boom)
    for task in [in_flight, *queued]:
        with pytest.raises(ActorDead) as info:
            await task
        assert info.value.reason is reason
    await waiting_tell  # was enqueued before the crash; dropped with the mailbox
    assert journal.events[-2:] == ["d.failure:Boom", "d.stop"]


async def test_pending_asks_fail_when_actor_is_stopped(system: ActorSystem, journal: Journal) -> None:
    ref = await system.spawn(Worker("w", journal), name="w")
    in_flight = asyncio.create_task(ref.ask(Block(asyncio.Event()), timeout=DEADLINE))
    await journal.wait_event("w.blocked")
    queued = asyncio.create_task(ref.ask(Get(), timeout=DEADLINE))
    # The handler never finishes: stop gives up after its timeout and cancels the actor.
    reason = await ref.stop(timeout=0.01)
    assert isinstance(reason, Shutdown)
    for task in (in_flight, queued):
        with pytest.raises(ActorDead):
            await task
    assert "w.stop" not in journal.events  # killed mid-handler: on_stop does not run (OTP brutal kill)
    assert system.failures == []


async def test_graceful_stop_finishes_current_message(system: ActorSystem, journal: Journal) -> None:
    ref = await system.spawn(Worker("w", journal), name="w")
    gate = asyncio.Event()
    in_flight = asyncio.create_task(ref.ask(Block(gate), timeout=DEADLINE))
    await journal.wait_event("w.blocked")
    queued = asyncio.create_task(ref.ask(Get(), timeout=DEADLINE))
    stopping = asyncio.create_task(ref.stop(timeout=DEADLINE))
    gate.set()
    assert await in_flight == "released"
    assert await stopping == SHUTDOWN
    with pytest.raises(ActorDead):
        await queued  # stop requests jump the queue: the Get was never handled
    assert journal.events[-1] == "w.stop"


# ---- mailboxes ---------------------------------------------------------------------------------------


async def test_full_mailbox_back_pressure(system: ActorSystem, journal: Journal) -> None:
    ref = await system.spawn(Worker("w", journal), name="w", mailbox_size=2)
    gate = asyncio.Event()
    ref.tell_nowait(Block(gate))
    await journal.wait_event("w.blocked")  # the actor holds the Block; the mailbox is empty again
    ref.tell_nowait(Add(1))
    ref.tell_nowait(Add(2))
    assert ref.statistics().mailbox_depth == 2
    with pytest.raises(MailboxFull):
        ref.tell_nowait(Add(4))
    with pytest.raises(MailboxFull):
        await ref.tell(Add(4), timeout=0.01)
    with pytest.raises(AskTimeout):
        await ref.ask(Get(), timeout=0.01)
    waiting = await started(ref.tell(Add(8), timeout=DEADLINE))
    assert ref.statistics().waiting_senders == 1
    assert not waiting.done()
    gate.set()  # the actor drains: the waiting sender gets in
    await waiting
    assert await ref.ask(Get(), timeout=DEADLINE) == 11


async def test_waiting_sender_gets_actor_dead(system: ActorSystem, journal: Journal) -> None:
    trigger = asyncio.Event()
    ref = await system.spawn(Doomed(journal, trigger), name="d", mailbox_size=1)
    ref.tell_nowait(Block(asyncio.Event()))
    await journal.wait_event("d.blocked")
    ref.tell_nowait(Ping())
    waiting = await started(ref.tell(Ping(), timeout=DEADLINE))
    assert ref.statistics().waiting_senders == 1
    trigger.set()
    with pytest.raises(ActorDead):
        await waiting


async def test_mailbox_size_class_default() -> None:
    class Tiny(Actor[int]):
        mailbox_size = 3

        async def receive(self, message: int) -> None:
            return None

    async with ActorSystem("s") as system:
        ref = await system.spawn(Tiny())
        assert ref.statistics().mailbox_size == 3
        ref2 = await system.spawn(Tiny(), mailbox_size=7)
        assert ref2.statistics().mailbox_size == 7
        assert ref2.name == "Tiny-2"


# ---- lifecycle -----------------------------------------------------------------------------------------


async def test_start_failure(system: ActorSystem, journal: Journal) -> None:
    with pytest.raises(StartFailed) as info:
        await system.spawn(Worker("w", journal, Script(fail_start=True)), name="w")
    assert isinstance(info.value.__cause__, Boom)
    assert journal.events == ["w.starting", "w.start_failed"]  # neither on_failure nor on_stop
    assert system.actors() == []
    assert system.failures == []


async def test_start_timeout(system: ActorSystem, journal: Journal) -> None:
    never = asyncio.Event()
    with pytest.raises(StartFailed) as info:
        await system.spawn(Worker("w", journal, Script(start_gate=never)), name="w", start_timeout=0.01)
    assert isinstance(info.value.__cause__, TimeoutError)
    assert system.actors() == []


async def test_spawn_returns_after_on_start(system: ActorSystem, journal: Journal) -> None:
    gate = asyncio.Event()
    spawning = asyncio.create_task(system.spawn(Worker("w", journal, Script(start_gate=gate)), name="w"))
    await journal.wait_event("w.starting")
    assert not spawning.done()
    gate.set()
    ref = await spawning
    assert journal.events == ["w.starting", "w.start"]
    assert ref.is_alive()


async def test_stop_self_is_normal(system: ActorSystem, journal: Journal) -> None:
    ref = await system.spawn(Worker("w", journal), name="w")
    await ref.tell(Exit())
    assert await ref.wait_stopped(DEADLINE) == NORMAL
    assert system.failures == []
    assert system.actors() == []


async def test_slow_on_stop_is_cut_by_timeout(system: ActorSystem, journal: Journal) -> None:
    ref = await system.spawn(Worker("w", journal, Script(stop_gate=asyncio.Event())), name="w")
    assert await ref.stop(timeout=0.01) == SHUTDOWN
    assert journal.events[-1] == "w.stop"
    assert ref.statistics().state is ActorState.STOPPED


async def test_failing_on_stop_turns_a_shutdown_into_a_failure(system: ActorSystem, journal: Journal) -> None:
    ref = await system.spawn(Worker("w", journal, Script(fail_stop=True)), name="w")
    reason = await ref.stop(timeout=DEADLINE)
    assert isinstance(reason, Boom)


async def test_wait_stopped_deadline(system: ActorSystem, journal: Journal) -> None:
    ref = await system.spawn(Worker("w", journal), name="w")
    with pytest.raises(TimeoutError):
        await ref.wait_stopped(0.01)


async def test_instance_spawned_once(system: ActorSystem, journal: Journal) -> None:
    worker = Worker("w", journal)
    await system.spawn(worker, name="a")
    with pytest.raises(RuntimeError, match="already spawned"):
        await system.spawn(worker, name="b")
    with pytest.raises(ValueError, match="taken"):
        await system.spawn(Worker("w", journal), name="a")
    with pytest.raises(RuntimeError, match="not spawned"):
        _ = Worker("x", journal).ref


async def test_system_stops_in_reverse_order(journal: Journal) -> None:
    async with ActorSystem("s") as system:
        for label in "abc":
            await system.spawn(Worker(label, journal), name=label)
        assert [r.name for r in system.actors()] == ["a", "b", "c"]
        assert [s.name for s in system.statistics()] == ["a", "b", "c"]
    assert journal.only("") == ["a.starting", "a.start", "b.starting", "b.start", "c.starting", "c.start",
                                "c.stop", "b.stop", "a.stop"]  # fmt: skip
    with pytest.raises(RuntimeError):
        await system.spawn(Worker("d", journal))


async def test_wait_failed_deadline(system: ActorSystem) -> None:
    with pytest.raises(TimeoutError):
        await system.wait_failed(0.01)


# ---- owned tasks -----------------------------------------------------------------------------------------


class Ticker(Actor[str]):
    """Owns a background task that counts ticks sent through a queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[int] = asyncio.Queue(maxsize=8)
        self.seen: list[int] = []
        self.cancelled = asyncio.Event()

    async def on_start(self) -> None:
        self.start_task(self._consume(), name="consume")

    async def _consume(self) -> None:
        try:
            while True:
                self.seen.append(await self.queue.get())
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def receive(self, message: str) -> int:
        return len(self.seen)


async def test_owned_task_is_cancelled_on_stop(system: ActorSystem) -> None:
    ticker = Ticker()
    ref = await system.spawn(ticker)
    assert ref.statistics().tasks == 1
    await ref.stop(timeout=DEADLINE)
    assert ticker.cancelled.is_set()
    with pytest.raises(ActorDead):
        ticker.start_task(asyncio.sleep(0), name="late")


async def test_owned_task_failure_crashes_idle_actor(system: ActorSystem, journal: Journal) -> None:
    trigger = asyncio.Event()
    ref = await system.spawn(Doomed(journal, trigger), name="d")
    trigger.set()
    assert isinstance(await ref.wait_stopped(DEADLINE), Boom)
    assert "d.failure:Boom" in journal.events


# ---- monitors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["crash", "stop", "exit"])
async def test_watch_delivers_down_with_reason(system: ActorSystem, journal: Journal, how: str) -> None:
    watcher_actor = Worker("watcher", journal)
    watcher = await system.spawn(watcher_actor, name="watcher")
    target = await system.spawn(Worker("t", journal), name="t")
    watcher_actor.watch(target)
    if how == "crash":
        await target.tell(Crash())
    elif how == "stop":
        await target.stop(timeout=DEADLINE)
    else:
        await target.tell(Exit())
    await journal.wait_for(lambda ev: any(e.startswith("watcher.down:t:") for e in ev))
    (down,) = watcher_actor.downs
    assert down.ref_name == "t"
    assert down.ref is target
    expected = {"crash": Boom, "stop": Shutdown, "exit": Normal}[how]
    assert isinstance(down.reason, expected)
    assert down.abnormal == (how == "crash")
    assert watcher.is_alive()


async def test_watch_dead_actor_delivers_down_at_once(system: ActorSystem, journal: Journal) -> None:
    watcher_actor = Worker("watcher", journal)
    await system.spawn(watcher_actor, name="watcher")
    target = await system.spawn(Worker("t", journal), name="t")
    await target.stop(timeout=DEADLINE)
    watcher_actor.watch(target)
    await journal.wait_event("watcher.down:t:shutdown")


async def test_unwatch_means_no_down(system: ActorSystem, journal: Journal) -> None:
    watcher_actor = Worker("watcher", journal)
    watcher = await system.spawn(watcher_actor, name="watcher")
    target = await system.spawn(Worker("t", journal), name="t")
    other = await system.spawn(Worker("o", journal), name="o")
    watcher_actor.watch(target)
    watcher_actor.watch(other)
    watcher_actor.unwatch(target)
    await target.stop(timeout=DEADLINE)
    await other.stop(timeout=DEADLINE)
    # Down notices ride the system lane, ahead of any user message: after this ask they are all handled.
    assert await watcher.ask(Ping(), timeout=DEADLINE) == "watcher"
    assert [d.ref_name for d in watcher_actor.downs] == ["o"]


async def test_watch_is_dropped_when_the_watcher_dies(system: ActorSystem, journal: Journal) -> None:
    watcher = await system.spawn(Worker("watcher", journal), name="watcher")
    target_actor = Worker("t", journal)
    target = await system.spawn(target_actor, name="t")
    watcher_actor = Worker("w2", journal)
    await system.spawn(watcher_actor, name="w2")
    watcher_actor.watch(target)
    await system.actors()[-1].stop(timeout=DEADLINE)
    assert target_actor._cell is not None and not target_actor._cell._watchers
    await target.stop(timeout=DEADLINE)
    assert watcher.is_alive()


async def test_down_handler_exception_crashes_the_watcher(system: ActorSystem) -> None:
    class Fragile(Actor[Down]):
        async def receive(self, message: Down) -> None:
            raise Boom(f"cannot cope with {message.ref_name}")

    fragile = Fragile()
    fragile_ref = await system.spawn(fragile)
    target = await system.spawn(Ticker(), name="t")
    fragile.watch(target)
    await target.stop(timeout=DEADLINE)
    assert isinstance(await fragile_ref.wait_stopped(DEADLINE), Boom)


async def test_cannot_watch_self(system: ActorSystem, journal: Journal) -> None:
    actor = Worker("w", journal)
    ref = await system.spawn(actor, name="w")
    with pytest.raises(ValueError):
        actor.watch(ref)

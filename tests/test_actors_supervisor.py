"""Supervisor: strategies, restart types, intensity and escalation, ordering, start failure, dynamic children.

Restarts are observed through the journal (each Worker records ``<label>.start`` / ``.stop``), never by
sleeping; restart intensity runs on a FakeClock the tests move by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from test_actors_helpers import (
    DEADLINE,
    Boom,
    Crash,
    Exit,
    FakeClock,
    Journal,
    Ping,
    Script,
    Worker,
    loop_guard,
    worker_factory,
)

from actors import (
    SHUTDOWN,
    Actor,
    ActorDead,
    ActorRef,
    ActorState,
    ActorSystem,
    ChildSpec,
    Restart,
    RestartIntensityExceeded,
    StartFailed,
    Strategy,
    Supervisor,
    SupervisorStats,
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


def specs(journal: Journal, labels: str, restart: Restart = Restart.PERMANENT) -> list[ChildSpec]:
    return [ChildSpec(label, worker_factory(label, journal), restart=restart) for label in labels]


def ref(sup: Supervisor, name: str) -> ActorRef[Any]:
    r = sup.child_ref(name)
    assert r is not None, f"{name} is not running"
    return r


async def crash(sup: Supervisor, name: str, *, settle: bool = True) -> None:
    """Crash child ``name``; with ``settle``, wait until its supervisor has handled the exit (restarts
    included)."""
    r = ref(sup, name)
    await r.tell(Crash(f"{name} crashed"))
    await r.wait_stopped(DEADLINE)
    if settle:
        await sup.wait_idle(DEADLINE)


def after(journal: Journal, mark: int) -> list[str]:
    return [e for e in journal.events[mark:] if not e.endswith(".starting")]


# ---- strategies ------------------------------------------------------------------------------------------


async def spawn_abc(system: ActorSystem, journal: Journal, strategy: Strategy) -> Supervisor:
    sup = Supervisor("sup", specs(journal, "abc"), strategy=strategy, max_restarts=10)
    await system.spawn(sup)
    return sup


async def test_one_for_one(system: ActorSystem, journal: Journal) -> None:
    sup = await spawn_abc(system, journal, Strategy.ONE_FOR_ONE)
    a, c = ref(sup, "a"), ref(sup, "c")
    mark = len(journal.events)
    await crash(sup, "b")
    await journal.wait_event("b.start", 2)
    assert after(journal, mark) == ["b.failure:Boom", "b.stop", "b.start"]
    assert ref(sup, "a") is a and ref(sup, "c") is c and a.is_alive() and c.is_alive()
    assert await ref(sup, "b").ask(Ping(), timeout=DEADLINE) == "b"


async def test_one_for_all(system: ActorSystem, journal: Journal) -> None:
    sup = await spawn_abc(system, journal, Strategy.ONE_FOR_ALL)
    old = {name: ref(sup, name) for name in "abc"}
    mark = len(journal.events)
    await crash(sup, "b")
    await journal.wait_event("c.start", 2)
    # the others stop in reverse order, then all start in order
    assert after(journal, mark) == ["b.failure:Boom", "b.stop", "c.stop", "a.stop", "a.start", "b.start", "c.start"]
    for name in "abc":
        assert not old[name].is_alive()
        assert ref(sup, name).is_alive()


async def test_rest_for_one(system: ActorSystem, journal: Journal) -> None:
    sup = await spawn_abc(system, journal, Strategy.REST_FOR_ONE)
    a = ref(sup, "a")
    mark = len(journal.events)
    await crash(sup, "b")
    await journal.wait_event("c.start", 2)
    assert after(journal, mark) == ["b.failure:Boom", "b.stop", "c.stop", "b.start", "c.start"]
    assert ref(sup, "a") is a and a.is_alive()


async def test_old_ref_is_dead_after_restart(system: ActorSystem, journal: Journal) -> None:
    sup = await spawn_abc(system, journal, Strategy.ONE_FOR_ONE)
    old = ref(sup, "a")
    await crash(sup, "a")
    await journal.wait_event("a.start", 2)
    with pytest.raises(ActorDead):
        await old.ask(Ping(), timeout=DEADLINE)
    new = ref(sup, "a")
    assert new is not old
    assert new.statistics().restarts == 1


# ---- restart types -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("restart", "how", "restarted"),
    [
        (Restart.PERMANENT, "crash", True),
        (Restart.PERMANENT, "exit", True),
        (Restart.PERMANENT, "stop", True),
        (Restart.TRANSIENT, "crash", True),
        (Restart.TRANSIENT, "exit", False),
        (Restart.TRANSIENT, "stop", False),
        (Restart.TEMPORARY, "crash", False),
        (Restart.TEMPORARY, "exit", False),
    ],
)
async def test_restart_types(
    system: ActorSystem, journal: Journal, restart: Restart, how: str, restarted: bool
) -> None:
    sup = Supervisor("sup", [*specs(journal, "x", restart), *specs(journal, "y")], max_restarts=10)
    await system.spawn(sup)
    x = ref(sup, "x")
    if how == "crash":
        await x.tell(Crash())
    elif how == "exit":
        await x.tell(Exit())
    else:
        await x.stop(timeout=DEADLINE)
    await x.wait_stopped(DEADLINE)
    await sup.wait_idle(DEADLINE)
    if restarted:
        assert journal.events.count("x.start") == 2
        assert ref(sup, "x").is_alive()
    else:
        assert journal.events.count("x.start") == 1
        assert sup.child_ref("x") is None
        names = [c.name for c in sup.which_children()]
        assert names == (["y"] if restart is Restart.TEMPORARY else ["x", "y"])


async def test_temporary_sibling_is_dropped_by_one_for_all(system: ActorSystem, journal: Journal) -> None:
    children = [*specs(journal, "a"), *specs(journal, "t", Restart.TEMPORARY), *specs(journal, "c")]
    sup = Supervisor("sup", children, strategy=Strategy.ONE_FOR_ALL, max_restarts=10)
    await system.spawn(sup)
    await crash(sup, "c")
    await journal.wait_event("c.start", 2)
    assert [c.name for c in sup.which_children()] == ["a", "c"]
    assert journal.events.count("t.start") == 1


# ---- intensity -----------------------------------------------------------------------------------------


async def test_intensity_exceeded_stops_children_and_fails(system: ActorSystem, journal: Journal) -> None:
    clock = FakeClock()
    sup = Supervisor("sup", specs(journal, "abc"), max_restarts=2, period_s=10.0, clock=clock)
    sup_ref = await system.spawn(sup)
    for n in (2, 3):
        await crash(sup, "b")
        await journal.wait_event("b.start", n)
        clock.advance(1.0)
    assert sup.statistics().recent_restarts == 2
    mark = len(journal.events)
    await crash(sup, "b", settle=False)  # third restart within 10 s: over the limit
    reason = await sup_ref.wait_stopped(DEADLINE)
    assert isinstance(reason, RestartIntensityExceeded)
    assert isinstance(reason.__cause__, Boom)
    assert after(journal, mark) == ["b.failure:Boom", "b.stop", "c.stop", "a.stop"]
    failure = await system.wait_failed(DEADLINE)
    assert failure.name == "sup" and failure.reason is reason


async def test_restarts_spread_over_time_do_not_escalate(system: ActorSystem, journal: Journal) -> None:
    clock = FakeClock()
    sup = Supervisor("sup", specs(journal, "a"), max_restarts=1, period_s=5.0, clock=clock)
    sup_ref = await system.spawn(sup)
    for n in range(2, 7):
        await crash(sup, "a")
        await journal.wait_event("a.start", n)
        clock.advance(5.0)
    assert sup_ref.is_alive()
    stats = sup.statistics()
    assert stats.child_restarts == 5
    assert stats.children[0].restarts == 5


async def test_zero_restarts_escalates_at_once(system: ActorSystem, journal: Journal) -> None:
    sup = Supervisor("sup", specs(journal, "a"), max_restarts=0)
    sup_ref = await system.spawn(sup)
    await crash(sup, "a", settle=False)
    assert isinstance(await sup_ref.wait_stopped(DEADLINE), RestartIntensityExceeded)


async def test_escalation_through_two_levels(system: ActorSystem, journal: Journal) -> None:
    """worker crashes → mid restarts it; past mid's intensity mid fails → top restarts mid; past top's
    intensity top fails → the system learns of it."""
    clock = FakeClock()

    def make_mid() -> Supervisor:
        journal.record("mid.made")
        return Supervisor("mid", specs(journal, "w"), max_restarts=1, period_s=10.0, clock=clock)

    top = Supervisor(
        "top",
        [*specs(journal, "s"), ChildSpec("mid", make_mid)],
        max_restarts=1,
        period_s=10.0,
        clock=clock,
    )
    top_ref = await system.spawn(top)

    async def crash_worker_twice(mid_incarnation: int) -> None:
        mid = ref(top, "mid")
        assert journal.events.count("mid.made") == mid_incarnation
        mid_sup = mid._cell.actor
        assert isinstance(mid_sup, Supervisor)
        starts = journal.events.count("w.start")
        await crash(mid_sup, "w")  # mid restarts w (1 of 1 allowed)
        await journal.wait_event("w.start", starts + 1)
        await crash(mid_sup, "w", settle=False)  # 2 > 1: mid gives up
        assert isinstance(await mid.wait_stopped(DEADLINE), RestartIntensityExceeded)

    await crash_worker_twice(1)
    await top.wait_idle(DEADLINE)  # top restarted mid (1 of 1 allowed), and mid its worker
    assert journal.events.count("mid.made") == 2
    assert journal.events.count("w.start") == 3
    assert top_ref.is_alive() and ref(top, "s").is_alive()
    assert top.statistics().children[1].restarts == 1

    await crash_worker_twice(2)  # mid fails again: 2 > 1, top gives up
    reason = await top_ref.wait_stopped(DEADLINE)
    assert isinstance(reason, RestartIntensityExceeded) and reason.supervisor == "test/top"
    inner = reason.__cause__
    assert isinstance(inner, RestartIntensityExceeded) and inner.supervisor == "test/top/mid"
    assert isinstance(inner.__cause__, Boom)
    assert journal.events[-1] == "s.stop"
    failure = await system.wait_failed(DEADLINE)
    assert failure.reason is reason


async def test_failed_restart_counts_against_intensity(system: ActorSystem, journal: Journal) -> None:
    script = Script()
    sup = Supervisor("sup", [ChildSpec("a", worker_factory("a", journal, script))], max_restarts=3, clock=FakeClock())
    sup_ref = await system.spawn(sup)
    script.fail_start = True  # every restart fails from now on
    await crash(sup, "a", settle=False)
    reason = await sup_ref.wait_stopped(DEADLINE)
    assert isinstance(reason, RestartIntensityExceeded)
    assert isinstance(reason.__cause__, StartFailed)
    assert journal.events.count("a.start_failed") == 3  # restarts 1..3 tried; the 4th is over the limit


async def test_failed_restart_recovers_within_budget(system: ActorSystem, journal: Journal) -> None:
    attempts = 0

    def flaky() -> Worker:
        nonlocal attempts
        attempts += 1
        return Worker("a", journal, Script(fail_start=attempts == 2))

    sup = Supervisor("sup", [ChildSpec("a", flaky)], max_restarts=3, clock=FakeClock())
    sup_ref = await system.spawn(sup)
    await crash(sup, "a")
    await journal.wait_event("a.start", 2)
    assert journal.events.count("a.start_failed") == 1
    assert sup_ref.is_alive() and ref(sup, "a").is_alive()


# ---- order, start failure, shutdown ------------------------------------------------------------------------


async def test_children_start_in_order_and_stop_in_reverse(journal: Journal) -> None:
    gate = asyncio.Event()
    children = [
        ChildSpec("a", worker_factory("a", journal)),
        ChildSpec("b", worker_factory("b", journal, Script(start_gate=gate))),
        ChildSpec("c", worker_factory("c", journal)),
    ]
    async with ActorSystem("s") as system:
        spawning = asyncio.create_task(system.spawn(Supervisor("sup", children)))
        await journal.wait_event("b.starting")
        assert "c.starting" not in journal.events  # c waits for b's on_start to finish
        assert not spawning.done()
        gate.set()
        await spawning
        assert journal.events == ["a.starting", "a.start", "b.starting", "b.start", "c.starting", "c.start"]
    assert journal.events[-3:] == ["c.stop", "b.stop", "a.stop"]


async def test_start_failure_stops_started_children(system: ActorSystem, journal: Journal) -> None:
    children = [
        ChildSpec("a", worker_factory("a", journal)),
        ChildSpec("b", worker_factory("b", journal, Script(fail_start=True))),
        ChildSpec("c", worker_factory("c", journal)),
    ]
    with pytest.raises(StartFailed) as info:
        await system.spawn(Supervisor("sup", children))
    child_failure = info.value.__cause__
    assert isinstance(child_failure, StartFailed) and child_failure.name == "test/sup/b"
    assert isinstance(child_failure.__cause__, Boom)
    assert journal.events == ["a.starting", "a.start", "b.starting", "b.start_failed", "a.stop"]
    assert system.actors() == []


async def test_per_child_shutdown_timeout(journal: Journal) -> None:
    children = [
        ChildSpec("a", worker_factory("a", journal)),
        ChildSpec("b", worker_factory("b", journal, Script(stop_gate=asyncio.Event())), shutdown_timeout=0.01),
        ChildSpec("c", worker_factory("c", journal)),
    ]
    async with ActorSystem("s") as system:
        sup = Supervisor("sup", children)
        await system.spawn(sup)
        b = ref(sup, "b")
    assert journal.events[-3:] == ["c.stop", "b.stop", "a.stop"]
    assert b.exit_reason == SHUTDOWN
    assert system.failures == []


async def test_killed_supervisor_takes_its_children_down(journal: Journal) -> None:
    """A supervisor whose own stop overruns its timeout is cancelled; its children are cancelled too."""
    children = [
        ChildSpec("a", worker_factory("a", journal)),
        ChildSpec("b", worker_factory("b", journal, Script(stop_gate=asyncio.Event())), shutdown_timeout=DEADLINE),
    ]
    async with ActorSystem("s", shutdown_timeout=0.01) as system:
        sup = Supervisor("sup", children)
        sup_ref = await system.spawn(sup)
        a, b = ref(sup, "a"), ref(sup, "b")
        assert await sup_ref.stop(timeout=0.01) == SHUTDOWN
    assert not a.is_alive() and not b.is_alive()


# ---- dynamic children, introspection ----------------------------------------------------------------------


async def test_dynamic_children(system: ActorSystem, journal: Journal) -> None:
    sup = Supervisor("stages", specs(journal, "a"))
    await system.spawn(sup)
    s1 = await sup.start_child(ChildSpec("s1", worker_factory("s1", journal)))
    assert await s1.ask(Ping(), timeout=DEADLINE) == "s1"
    assert [c.name for c in sup.which_children()] == ["a", "s1"]
    with pytest.raises(ValueError, match="duplicate"):
        await sup.start_child(ChildSpec("s1", worker_factory("s1", journal)))
    with pytest.raises(StartFailed):
        await sup.start_child(ChildSpec("bad", worker_factory("bad", journal, Script(fail_start=True))))
    assert [c.name for c in sup.which_children()] == ["a", "s1"]

    await crash(sup, "s1")  # dynamic children are supervised like static ones
    await journal.wait_event("s1.start", 2)

    reason = await sup.terminate_child("s1")
    assert reason == SHUTDOWN
    assert [c.name for c in sup.which_children()] == ["a"]
    assert journal.events.count("s1.start") == 2  # not restarted
    with pytest.raises(KeyError):
        await sup.terminate_child("s1")


async def test_statistics(system: ActorSystem, journal: Journal) -> None:
    clock = FakeClock()
    sup = Supervisor("sup", specs(journal, "ab"), strategy=Strategy.REST_FOR_ONE, clock=clock)
    sup_ref = await system.spawn(sup)
    await crash(sup, "a")
    await journal.wait_event("b.start", 2)
    stats = sup_ref.statistics()
    assert isinstance(stats, SupervisorStats)
    assert stats.state is ActorState.RUNNING
    assert stats.strategy is Strategy.REST_FOR_ONE
    assert (stats.max_restarts, stats.period_s) == (3, 5.0)
    assert stats.recent_restarts == 1
    assert stats.child_restarts == 2  # a restarted, b restarted along with it
    a_stats, b_stats = stats.children
    assert a_stats.name == "a" and a_stats.running and a_stats.restarts == 1
    assert a_stats.last_exit is not None and "Boom" in a_stats.last_exit
    assert b_stats.last_exit == "shutdown"
    assert a_stats.actor is not None and a_stats.actor.path == "test/sup/a"
    clock.advance(10.0)
    assert sup.statistics().recent_restarts == 0
    assert [s.name for s in system.statistics()] == ["sup"]


async def test_supervisor_takes_no_messages(system: ActorSystem) -> None:
    sup = Supervisor("sup")
    sup_ref: ActorRef[Any] = await system.spawn(sup)
    with pytest.raises(TypeError):
        await sup_ref.ask("hello", timeout=DEADLINE)
    assert sup_ref.is_alive()


async def test_duplicate_child_names_rejected() -> None:
    journal = Journal()
    with pytest.raises(ValueError):
        Supervisor("sup", specs(journal, "aa"))
    with pytest.raises(ValueError):
        ChildSpec("a/b", worker_factory("x", journal))


class Stage(Actor[str]):
    """A child that asks its supervisor for a sibling: calls hop onto the supervisor's task."""

    def __init__(self, sup: Callable[[], Supervisor], journal: Journal) -> None:
        self.sup = sup
        self.journal = journal

    async def receive(self, message: str) -> Any:
        extra = await self.sup().start_child(ChildSpec(message, worker_factory(message, self.journal)))
        return await extra.ask(Ping(), timeout=DEADLINE)


async def test_child_can_add_a_sibling(system: ActorSystem, journal: Journal) -> None:
    holder: list[Supervisor] = []
    sup = Supervisor("sup", [ChildSpec("stage", lambda: Stage(lambda: holder[0], journal))])
    holder.append(sup)
    await system.spawn(sup)
    assert await ref(sup, "stage").ask("helper", timeout=DEADLINE) == "helper"
    names: Sequence[str] = [c.name for c in sup.which_children()]
    assert names == ["stage", "helper"]


async def test_factory_error_is_a_start_failure(system: ActorSystem, journal: Journal) -> None:
    made = 0

    def factory() -> Worker:
        nonlocal made
        made += 1
        if made > 1:
            raise Boom("cannot build")
        return Worker("a", journal)

    sup = Supervisor("sup", [ChildSpec("a", factory)], max_restarts=2, clock=FakeClock())
    sup_ref = await system.spawn(sup)
    await crash(sup, "a", settle=False)
    reason = await sup_ref.wait_stopped(DEADLINE)
    assert isinstance(reason, RestartIntensityExceeded)
    assert isinstance(reason.__cause__, StartFailed) and isinstance(reason.__cause__.__cause__, Boom)
    assert made == 3  # the first build, then two failed restarts; the third restart is over the limit

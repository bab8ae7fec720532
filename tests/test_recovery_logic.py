"""Failure classification, adaptive thresholds and measured step deadlines (pure, injected clock)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exo_stable.pipeline.recovery import (
    FailureClass,
    FailureKind,
    RecoveryManager,
    RecoveryThresholds,
    ReplayMode,
    StepDeadline,
)
from exo_stable.wire.messages import RecoveryAction


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("kind", "cls", "action", "replan"),
    [
        (FailureKind.NODE_LOST, FailureClass.PERSISTENT, RecoveryAction.RESTART_PIPELINE, True),
        (FailureKind.NO_PLAN, FailureClass.CATASTROPHIC, RecoveryAction.FALLBACK_SINGLE_DEVICE, True),
        (FailureKind.CHECKSUM, FailureClass.TRANSIENT, RecoveryAction.REGENERATE, False),
        (FailureKind.STEP_DEADLINE, FailureClass.TRANSIENT, RecoveryAction.RESTART_PIPELINE, False),
        (FailureKind.STAGE_FAILURE, FailureClass.TRANSIENT, RecoveryAction.RESTART_PIPELINE, False),
        (FailureKind.PLAN_REPLACED, FailureClass.TRANSIENT, RecoveryAction.RESTART_PIPELINE, True),
        (FailureKind.STAGE_ESCALATED, FailureClass.PERSISTENT, RecoveryAction.RESTART_PIPELINE, True),
    ],
)
def test_first_failure_of_each_kind(kind: FailureKind, cls: FailureClass, action: RecoveryAction, replan: bool) -> None:
    manager = RecoveryManager(clock=Clock())
    decision = manager.classify(manager.event(kind, "n1", ("r1",), "evidence"))
    assert (decision.failure_class, decision.action, decision.replan) == (cls, action, replan)


def test_repeats_within_the_window_become_persistent_and_age_out() -> None:
    clock = Clock()
    manager = RecoveryManager(RecoveryThresholds(window_s=60, base_repeats=3), clock=clock)
    classes = []
    for _ in range(3):
        classes.append(manager.classify(manager.event(FailureKind.STEP_DEADLINE, "n2", (), "slow")).failure_class)
        clock.now += 1
    assert classes == [FailureClass.TRANSIENT, FailureClass.TRANSIENT, FailureClass.PERSISTENT]
    assert manager.suspects() == frozenset({"n2"})
    assert manager.classify(manager.event(FailureKind.STEP_DEADLINE, "n3", (), "slow")).failure_class == (
        FailureClass.TRANSIENT
    ), "another node's failures do not count against it"
    clock.now += 3600
    assert manager.suspects() == frozenset()
    assert manager.classify(manager.event(FailureKind.STEP_DEADLINE, "n2", (), "slow")).failure_class == (
        FailureClass.TRANSIENT
    )


def test_the_repeat_threshold_adapts_to_the_background_rate() -> None:
    clock = Clock()
    t = RecoveryThresholds(window_s=60, base_repeats=3, long_window_s=600, max_repeats=12)
    manager = RecoveryManager(t, clock=clock)
    assert manager.repeat_threshold(clock.now) == 3
    for i in range(60):  # a flaky but working network: 60 failures spread over ten minutes and many nodes
        manager.classify(manager.event(FailureKind.CHECKSUM, f"n{i % 7}", (), "crc"))
        clock.now += 10
    assert manager.repeat_threshold(clock.now) > 3
    clock.now += 10_000
    assert manager.repeat_threshold(clock.now) == 3, "and falls back when the network is clean again"


def test_outcomes_and_resume_times_are_reported() -> None:
    manager = RecoveryManager(clock=Clock())
    manager.classify(manager.event(FailureKind.NODE_LOST, "n1", ("r",), "closed"))
    for seconds in (0.5, 1.0, 4.0):
        manager.outcome("replayed", seconds)
    manager.outcome("failed")
    snap = manager.snapshot()
    assert snap["events"] == {"node_lost": 1}
    assert snap["outcomes"] == {"replayed": 3, "failed": 1}
    assert snap["resume_p50_s"] == 1.0 and snap["resume_p99_s"] == 4.0


def test_step_deadline_starts_at_the_initial_value_then_follows_measured_steps() -> None:
    deadline = StepDeadline(initial_s=60, floor_s=1, ceiling_s=120, warmup=4)
    for _ in range(3):
        deadline.observe(0.1)
    assert deadline.deadline() == 60
    for _ in range(20):
        deadline.observe(0.1)
    fast = deadline.deadline()
    assert fast == 1, "steady 0.1 s steps: the floor"
    for _ in range(40):
        deadline.observe(2.0)
    assert deadline.deadline() > 10 * fast, "a stage that got slower stretches its deadline"


@given(st.lists(st.floats(0, 500, allow_nan=False), min_size=1, max_size=200))
def test_step_deadline_stays_within_its_bounds(steps: list[float]) -> None:
    deadline = StepDeadline(initial_s=60, floor_s=2, ceiling_s=120, warmup=4)
    for step in steps:
        deadline.observe(step)
        assert 2 <= deadline.deadline() <= 120


def test_negative_step_times_are_refused() -> None:
    with pytest.raises(ValueError):
        StepDeadline().observe(-1.0)


@pytest.mark.parametrize(
    ("kind", "mechanism"),
    [
        (FailureKind.CHECKSUM, "regenerate"),
        (FailureKind.STAGE_FAILURE, "replay"),
        (FailureKind.NODE_LOST, "replan"),
        (FailureKind.STAGE_ESCALATED, "replan"),
        (FailureKind.NO_PLAN, "fallback"),
    ],
)
def test_each_decision_names_its_mechanism(kind: FailureKind, mechanism: str) -> None:
    manager = RecoveryManager(clock=Clock())
    assert manager.classify(manager.event(kind, "n1", ("r1",), "evidence")).mechanism == mechanism
    assert manager.snapshot()["mechanisms"] == {mechanism: 1}


def test_a_crash_loop_makes_the_node_suspect() -> None:
    clock = Clock()
    manager = RecoveryManager(RecoveryThresholds(base_repeats=3), clock=clock)
    decisions = []
    for _ in range(3):
        decisions.append(manager.classify(manager.event(FailureKind.STAGE_FAILURE, "n1", ("r",), "crashed")))
        clock.now += 1
    assert [d.failure_class for d in decisions] == [FailureClass.TRANSIENT] * 2 + [FailureClass.PERSISTENT]
    assert decisions[-1].replan and decisions[-1].mechanism == "replan"
    assert manager.suspects() == frozenset({"n1"})


def test_resume_times_are_reported_per_replay_mode() -> None:
    manager = RecoveryManager(clock=Clock())
    manager.outcome("resumed", 2.0, mode=ReplayMode.EXACT.value)
    manager.outcome("resumed", 0.5, mode=ReplayMode.FAST.value)
    manager.outcome("resumed", 0.7, mode=ReplayMode.FAST.value)
    manager.replanned(0.3)
    snap = manager.snapshot()
    assert snap["resume_by_mode"] == {
        "exact": {"n": 1, "p50_s": 2.0, "p99_s": 2.0},
        "fast": {"n": 2, "p50_s": 0.5, "p99_s": 0.7},
    }
    assert snap["replan_p50_s"] == 0.3 and snap["resume_p99_s"] == 2.0

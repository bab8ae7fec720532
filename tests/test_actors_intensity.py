"""Restart intensity (pure, clock injected) and the restart-type rule: table-driven and with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors import NORMAL, SHUTDOWN, Restart, RestartIntensity, restart_allowed, should_restart


def model_allowed(times: list[float], max_restarts: int, period_s: float) -> list[bool]:
    """Brute force: restart i is allowed when the restarts in (t_i - period, t_i], i included, are <= max."""
    out = []
    for i, now in enumerate(times):
        window = [t for t in times[: i + 1] if t > now - period_s]
        out.append(len(window) <= max_restarts)
    return out


@pytest.mark.parametrize(
    ("times", "max_restarts", "period_s", "expected"),
    [
        ([0.0], 0, 5.0, [False]),
        ([0.0], 1, 5.0, [True]),
        ([0.0, 1.0, 2.0, 3.0], 3, 5.0, [True, True, True, False]),
        ([0.0, 5.0, 10.0, 15.0], 1, 5.0, [True, True, True, True]),  # exactly one period apart: window is open
        ([0.0, 4.9], 1, 5.0, [True, False]),
        ([0.0, 1.0, 6.5, 7.0], 2, 5.0, [True, True, True, True]),
        ([0.0, 0.0, 0.0], 2, 1.0, [True, True, False]),
    ],
)
def test_table(times: list[float], max_restarts: int, period_s: float, expected: list[bool]) -> None:
    history: tuple[float, ...] = ()
    got = []
    for now in times:
        history, ok = restart_allowed(history, now, max_restarts=max_restarts, period_s=period_s)
        got.append(ok)
    assert got == expected


times_strategy = st.lists(st.floats(min_value=0.0, max_value=10.0, allow_nan=False), max_size=40).map(sorted)


@given(
    times=times_strategy,
    max_restarts=st.integers(min_value=0, max_value=6),
    period_s=st.floats(min_value=0.01, max_value=5.0),
)
def test_matches_brute_force_model_until_first_escalation(
    times: list[float], max_restarts: int, period_s: float
) -> None:
    intensity = RestartIntensity(max_restarts, period_s)
    expected = model_allowed(times, max_restarts, period_s)
    for now, want in zip(times, expected, strict=True):
        assert intensity.record(now) == want
        if not want:
            break  # a supervisor escalates here; nothing after it matters


@given(
    times=times_strategy,
    max_restarts=st.integers(min_value=0, max_value=6),
    period_s=st.floats(min_value=0.01, max_value=5.0),
)
def test_history_is_bounded_and_recent(times: list[float], max_restarts: int, period_s: float) -> None:
    history: tuple[float, ...] = ()
    for now in times:
        history, _ = restart_allowed(history, now, max_restarts=max_restarts, period_s=period_s)
        assert len(history) <= max_restarts + 1
        assert all(t > now - period_s for t in history)
        assert history[-1] == now


@given(
    start=st.floats(min_value=0.0, max_value=1e6),
    count=st.integers(min_value=1, max_value=30),
    max_restarts=st.integers(min_value=1, max_value=5),
    period_s=st.floats(min_value=0.01, max_value=100.0),
)
def test_restarts_spaced_a_period_apart_never_escalate(
    start: float, count: int, max_restarts: int, period_s: float
) -> None:
    intensity = RestartIntensity(max_restarts, period_s)
    for i in range(count):
        assert intensity.record(start + i * period_s * 1.001)
    assert intensity.total == count
    assert not intensity.exceeded


@given(
    now=st.floats(min_value=0.0, max_value=1e6),
    max_restarts=st.integers(min_value=0, max_value=10),
    period_s=st.floats(min_value=0.01, max_value=100.0),
)
def test_a_burst_escalates_exactly_at_max_plus_one(now: float, max_restarts: int, period_s: float) -> None:
    intensity = RestartIntensity(max_restarts, period_s)
    results = [intensity.record(now) for _ in range(max_restarts + 1)]
    assert results == [True] * max_restarts + [False]
    assert intensity.exceeded
    assert intensity.recent(now) == max_restarts + 1


def test_invalid_parameters_are_rejected() -> None:
    with pytest.raises(ValueError):
        RestartIntensity(-1, 1.0)
    with pytest.raises(ValueError):
        RestartIntensity(1, 0.0)
    with pytest.raises(ValueError):
        restart_allowed((), 0.0, max_restarts=1, period_s=-1.0)


@pytest.mark.parametrize(
    ("restart", "reason", "expected"),
    [
        (Restart.PERMANENT, NORMAL, True),
        (Restart.PERMANENT, SHUTDOWN, True),
        (Restart.PERMANENT, RuntimeError("x"), True),
        (Restart.TRANSIENT, NORMAL, False),
        (Restart.TRANSIENT, SHUTDOWN, False),
        (Restart.TRANSIENT, RuntimeError("x"), True),
        (Restart.TEMPORARY, NORMAL, False),
        (Restart.TEMPORARY, SHUTDOWN, False),
        (Restart.TEMPORARY, RuntimeError("x"), False),
    ],
)
def test_should_restart(restart: Restart, reason: object, expected: bool) -> None:
    assert should_restart(restart, reason) == expected  # type: ignore[arg-type]

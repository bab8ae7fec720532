"""NetworkHealthMonitor with an injected clock (pure)."""

from __future__ import annotations

import pytest

from exo_stable.wire.health import HealthConfig, NetworkHealthMonitor, PeerState


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make() -> tuple[NetworkHealthMonitor, Clock]:
    clock = Clock()
    cfg = HealthConfig(window_s=10, dead_after_s=5, suspect_after_s=2, slow_rtt_floor_s=0.05, slow_rtt_factor=4)
    return NetworkHealthMonitor(cfg, clock=clock), clock


def test_unknown_alive_slow_dead() -> None:
    mon, clock = make()
    assert mon.state("p") is PeerState.UNKNOWN
    for _ in range(20):
        mon.record_rtt("p", 0.01)
        mon.record_received("p")
    assert mon.state("p") is PeerState.ALIVE
    clock.t += 3  # heartbeats late, not yet dead
    assert mon.state("p") is PeerState.SLOW
    clock.t += 3
    assert mon.state("p") is PeerState.DEAD
    mon.record_received("p")
    assert mon.state("p") is PeerState.ALIVE


def test_high_rtt_is_slow_not_dead() -> None:
    mon, clock = make()
    for _ in range(10):
        mon.record_rtt("p", 0.01)
    for _ in range(16):
        clock.t += 0.1
        mon.record_rtt("p", 0.5)  # 50x the baseline, heard all the time
    assert mon.state("p") is PeerState.SLOW
    assert mon.snapshot("p").rtt_p99_s == pytest.approx(0.5)


def test_rates_over_the_sliding_window_and_suggested_timeout() -> None:
    mon, clock = make()
    mon.record_sent("p", 100)
    mon.record_retransmit("p", 5)
    mon.record_received("p", 90)
    mon.record_corrupt("p", 10)
    for r in (0.01, 0.02, 0.03, 0.2):
        mon.record_rtt("p", r)
    clock.t += 1
    snap = mon.snapshot("p")
    assert snap.loss_rate == pytest.approx(0.05)
    assert snap.corruption_rate == pytest.approx(0.1)
    assert snap.retransmit_rate_per_s == pytest.approx(5.0)
    assert snap.suggested_timeout_s == pytest.approx(0.2 * 4 + 0.05)
    clock.t += 30  # everything left the window; totals remain
    snap = mon.snapshot("p")
    assert (snap.sent, snap.retransmits, snap.loss_rate, snap.rtt_samples) == (0, 0, 0.0, 0)
    assert (snap.total_sent, snap.total_corrupt) == (100, 10)
    assert snap.suggested_timeout_s == mon.config.default_timeout_s
    assert set(mon.snapshot_all()) == {"p"}

"""Send/receive windows: exactly once, in order, over a simulated lossy channel (pure)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo_stable.wire.reliable import ReceiveWindow, RttEstimator, SendWindow


def test_receive_window_dedupes_and_reorders() -> None:
    rx = ReceiveWindow(window=4)
    assert rx.on_data(2, b"b") == []
    assert rx.sack() == 0b1  # seq 2 == ack + 2 + 0
    assert rx.on_data(3, b"c") == []
    assert rx.on_data(2, b"b") == []  # duplicate
    assert rx.on_data(9, b"far") == []  # beyond the window
    assert rx.on_data(1, b"a") == [b"a", b"b", b"c"]
    assert rx.on_data(1, b"a") == []
    assert (rx.ack, rx.sack(), rx.buffered) == (3, 0, 0)
    assert (rx.stats.duplicates, rx.stats.out_of_window, rx.stats.delivered) == (2, 1, 3)


def test_send_window_back_pressure_and_cumulative_ack() -> None:
    tx = SendWindow(window=3, window_bytes=100)
    for i in range(3):
        tx.push(bytes([i]))
    assert not tx.has_space(1)
    with pytest.raises(OverflowError):
        tx.push(b"x")
    sent = tx.poll(0.0)
    assert [t.seq for t in sent] == [1, 2, 3] and not any(t.retransmit for t in sent)
    assert tx.on_ack(2, 0, 0.01) == 2
    assert tx.rtt.srtt == pytest.approx(0.01)
    assert tx.base == 3 and tx.has_space(1)
    tx.on_ack(3, 0, 0.02)
    assert tx.all_acked()


def test_send_window_byte_limit_lets_one_big_payload_through() -> None:
    tx = SendWindow(window=10, window_bytes=10)
    tx.push(b"x" * 50)  # alone in the window: allowed
    assert not tx.has_space(1)


def test_timer_retransmits_the_oldest_with_backoff() -> None:
    tx = SendWindow(window=8, rtt=RttEstimator(initial_rto=0.1, min_rto=0.1, max_rto=1.0))
    tx.push(b"a")
    tx.push(b"b")
    tx.poll(0.0)
    deadline = tx.next_deadline()
    assert deadline is not None
    assert tx.poll(deadline - 1e-6) == []
    first = tx.poll(deadline)
    assert [(t.seq, t.retransmit) for t in first] == [(1, True)]
    second_deadline = tx.next_deadline()
    assert second_deadline is not None and second_deadline - deadline > deadline  # backed off
    assert tx.stats.timeout_retransmissions == 1


def test_selective_ack_triggers_fast_retransmit_of_the_hole_only() -> None:
    tx = SendWindow(window=16, reorder_tolerance=2)
    for i in range(8):
        tx.push(bytes([i]))
    tx.poll(0.0)
    # seq 1 lost; 2..8 received: ack=0, sack bits for 2..8 (bit i => seq 2+i)
    tx.on_ack(0, 0b1111111, 0.001)
    again = tx.poll(0.002)
    assert [t.seq for t in again] == [1]
    assert tx.stats.fast_retransmissions == 1
    tx.on_ack(8, 0, 0.003)
    assert tx.all_acked()


def test_reconnect_requeues_everything_unacked_in_order() -> None:
    tx = SendWindow(window=16)
    for i in range(5):
        tx.push(bytes([i]))
    tx.poll(0.0)
    tx.on_ack(2, 0b1, 0.001)  # 1, 2 acked, 4 sacked
    tx.requeue_all(forget_sacks=False)
    assert [t.seq for t in tx.poll(0.002)] == [3, 5]
    tx.requeue_all(forget_sacks=True)
    assert [t.seq for t in tx.poll(0.003)] == [3, 4, 5]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=300),
    drop=st.floats(min_value=0.0, max_value=0.3),
    dup=st.floats(min_value=0.0, max_value=0.3),
    reorder=st.integers(min_value=0, max_value=8),
    window=st.integers(min_value=1, max_value=64),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_exactly_once_in_order_over_a_lossy_channel(  # noqa: PLR0917
    n: int, drop: float, dup: float, reorder: int, window: int, seed: int
) -> None:
    rng = random.Random(seed)
    tx = SendWindow(window=window, rtt=RttEstimator(initial_rto=0.05, min_rto=0.01, max_rto=0.2))
    rx = ReceiveWindow(window=window)
    payloads = [i.to_bytes(4, "little") for i in range(n)]
    delivered: list[bytes] = []
    in_transit: list[tuple[int, bytes]] = []
    now = 0.0
    pending = list(payloads)
    for _ in range(200_000):
        if len(delivered) == n and tx.all_acked():
            break
        while pending and tx.has_space(4):
            tx.push(pending.pop(0))
        for t in tx.poll(now):
            if rng.random() < drop:
                continue
            in_transit.append((t.seq, t.payload))
            if rng.random() < dup:
                in_transit.append((t.seq, t.payload))
        if in_transit:
            i = rng.randrange(min(len(in_transit), reorder + 1))
            seq, payload = in_transit.pop(i)
            delivered += rx.on_data(seq, payload)
            if rng.random() >= drop:  # the ack may be lost too
                tx.on_ack(rx.ack, rx.sack(), now)
        else:
            deadline = tx.next_deadline()
            now = max(now + 0.001, deadline if deadline is not None else now)
        now += 0.0005
    assert delivered == payloads
    assert tx.all_acked()

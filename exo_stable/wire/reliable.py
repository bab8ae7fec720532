"""Reliable delivery state machines for one link direction. Pure: no IO, no asyncio, time passed in.

:class:`SendWindow` numbers outgoing payloads, keeps them until acknowledged and says what to (re)send when;
:class:`ReceiveWindow` suppresses duplicates and reorders so payloads come out exactly once, in order.

Loss is repaired two ways:

- selective acks: the receiver reports, besides its cumulative ack, which of the next 64 sequence numbers it
  already holds; a frame still missing after ``reorder_tolerance`` frames sent *later* than it were
  received is resent at once (loss detection by transmission order, in the manner of TCP RACK);
- one retransmission timer, as in TCP (RFC 6298 RTO from RTT samples, Karn's rule, exponential backoff),
  restarted whenever the cumulative ack moves; when it fires, the oldest unacknowledged frame is resent.
  It catches losses that no later frame reveals (the tail of a burst). A timer per frame was tried first
  and fired spuriously for frames queued behind a hole being repaired.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

SACK_BITS = 64


class RttEstimator:
    """Smoothed RTT and retransmission timeout after RFC 6298, bounded by ``min_rto``/``max_rto``."""

    __slots__ = ("max_rto", "min_rto", "rttvar", "srtt")

    def __init__(self, *, initial_rto: float = 0.2, min_rto: float = 0.02, max_rto: float = 2.0) -> None:
        if not 0 < min_rto <= max_rto:
            raise ValueError("need 0 < min_rto <= max_rto")
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.srtt: float | None = None
        self.rttvar = initial_rto / 2

    def sample(self, rtt: float) -> None:
        if rtt < 0:
            return
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def rto(self) -> float:
        base = (self.srtt if self.srtt is not None else 0.0) + 4 * self.rttvar
        return min(self.max_rto, max(self.min_rto, base))


@dataclass(slots=True)
class _Pending:
    seq: int
    payload: bytes
    attempts: int = 0
    first_sent: float = -1.0
    tx_order: int = -1
    sacked: bool = False
    queued: bool = False


@dataclass(slots=True)
class SendStats:
    pushed: int = 0
    transmissions: int = 0
    retransmissions: int = 0
    fast_retransmissions: int = 0
    timeout_retransmissions: int = 0
    acked: int = 0


@dataclass(slots=True)
class Transmission:
    seq: int
    payload: bytes
    retransmit: bool


@dataclass(slots=True)
class SendWindow:
    """Outgoing sequence state. At most ``window`` payloads (and ``window_bytes`` bytes) are unacked."""

    window: int = 256
    window_bytes: int = 32 << 20
    rtt: RttEstimator = field(default_factory=RttEstimator)
    reorder_tolerance: int = 3
    next_seq: int = 1
    stats: SendStats = field(default_factory=SendStats)
    _inflight: dict[int, _Pending] = field(default_factory=dict)
    _bytes: int = 0
    _queue: deque[int] = field(default_factory=deque)
    _deadline: float | None = None
    _backoff: int = 1
    _tx_counter: int = 0
    _acked_tx_order: int = -1

    @property
    def base(self) -> int:
        """Lowest sequence number not yet cumulatively acknowledged."""
        return next(iter(self._inflight), self.next_seq)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def bytes_in_flight(self) -> int:
        return self._bytes

    def all_acked(self) -> bool:
        return not self._inflight

    def has_space(self, nbytes: int) -> bool:
        if self.next_seq - self.base >= self.window:
            return False
        # One payload may always go when nothing is in flight, however large (it fits a frame).
        return not self._inflight or self._bytes + nbytes <= self.window_bytes

    def push(self, payload: bytes) -> int:
        if not self.has_space(len(payload)):
            raise OverflowError("send window is full")
        seq = self.next_seq
        self.next_seq += 1
        self._inflight[seq] = _Pending(seq, payload, queued=True)
        self._bytes += len(payload)
        self._queue.append(seq)
        self.stats.pushed += 1
        return seq

    def on_ack(self, ack: int, sack: int, now: float) -> int:
        """Apply a cumulative ack and selective-ack bits; returns how many payloads left the window."""
        released = 0
        rtt_sample: float | None = None
        inflight = self._inflight
        while inflight:
            seq = next(iter(inflight))
            if seq > ack:
                break
            p = inflight.pop(seq)
            self._bytes -= len(p.payload)
            released += 1
            self._acked_tx_order = max(self._acked_tx_order, p.tx_order)
            if p.attempts == 1:  # Karn: never time a retransmitted frame
                rtt_sample = now - p.first_sent
        if sack:
            bit = 0
            bits = sack
            while bits:
                if bits & 1:
                    p_or_none = inflight.get(ack + 2 + bit)
                    if p_or_none is not None and not p_or_none.sacked:
                        p_or_none.sacked = True
                        self._acked_tx_order = max(self._acked_tx_order, p_or_none.tx_order)
                bits >>= 1
                bit += 1
            # Only frames below the highest one known received can be judged lost; the receiver holds
            # frames beyond the 64 selective-ack bits too, so silence about them means nothing.
            self._detect_losses(ack + 1 + sack.bit_length())
        if rtt_sample is not None:
            self.rtt.sample(rtt_sample)
        if released:
            self._backoff = 1
            self._deadline = now + self.rtt.rto() if inflight else None
        self.stats.acked += released
        return released

    def _detect_losses(self, highest_received: int) -> None:
        horizon = self._acked_tx_order - self.reorder_tolerance
        for p in self._inflight.values():
            if p.seq >= highest_received:
                break
            if p.attempts > 0 and not p.sacked and not p.queued and p.tx_order < horizon:
                p.queued = True
                self._queue.append(p.seq)
                self.stats.fast_retransmissions += 1

    def poll(self, now: float) -> list[Transmission]:
        """What to put on the wire now: queued payloads (new, fast-retransmit) and expired timers."""
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            for oldest in self._inflight.values():
                if oldest.attempts > 0 and not oldest.sacked and not oldest.queued:
                    oldest.queued = True
                    self._queue.append(oldest.seq)
                    self.stats.timeout_retransmissions += 1
                    self._backoff = min(self._backoff * 2, 64)
                    break
        out: list[Transmission] = []
        while self._queue:
            seq = self._queue.popleft()
            pending = self._inflight.get(seq)
            if pending is None or not pending.queued:
                continue
            p = pending
            p.queued = False
            retransmit = p.attempts > 0
            if not retransmit:
                p.first_sent = now
            p.attempts += 1
            p.tx_order = self._tx_counter
            self._tx_counter += 1
            self.stats.transmissions += 1
            if retransmit:
                self.stats.retransmissions += 1
            out.append(Transmission(seq, p.payload, retransmit))
        if out and self._deadline is None:
            self._deadline = now + min(self.rtt.max_rto, self.rtt.rto() * self._backoff)
        return out

    def has_queued(self) -> bool:
        return bool(self._queue)

    def next_deadline(self) -> float | None:
        """When the retransmission timer expires (None while nothing is in flight)."""
        return self._deadline if self._inflight else None

    def requeue_all(self, *, forget_sacks: bool) -> None:
        """After a reconnect: everything unacknowledged goes out again, in order.

        ``forget_sacks`` when the peer is a new incarnation whose receive state was lost.
        """
        self._queue.clear()
        self._deadline = None
        self._backoff = 1
        for p in self._inflight.values():
            if forget_sacks:
                p.sacked = False
            p.queued = not p.sacked
            if p.queued:
                self._queue.append(p.seq)


@dataclass(slots=True)
class ReceiveStats:
    delivered: int = 0
    duplicates: int = 0
    out_of_window: int = 0
    reordered: int = 0


@dataclass(slots=True)
class ReceiveWindow:
    """Incoming sequence state: payloads come out exactly once, in sequence order.

    Holds at most ``window`` out-of-order payloads (the sender never has more than that unacked).
    """

    window: int = 256
    expected: int = 1
    stats: ReceiveStats = field(default_factory=ReceiveStats)
    _buffer: dict[int, bytes] = field(default_factory=dict)

    def reset(self, start: int) -> None:
        self.expected = start
        self._buffer.clear()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def on_data(self, seq: int, payload: bytes) -> list[bytes]:
        """Accept one DATA frame; returns the payloads now deliverable, in order (maybe none)."""
        if seq < self.expected or seq in self._buffer:
            self.stats.duplicates += 1
            return []
        if seq >= self.expected + self.window:
            self.stats.out_of_window += 1
            return []
        if seq != self.expected:
            self._buffer[seq] = payload
            self.stats.reordered += 1
            return []
        out = [payload]
        nxt = seq + 1
        buf = self._buffer
        while nxt in buf:
            out.append(buf.pop(nxt))
            nxt += 1
        self.expected = nxt
        self.stats.delivered += len(out)
        return out

    @property
    def ack(self) -> int:
        return self.expected - 1

    def sack(self) -> int:
        """Bit i set when seq ``expected + 1 + i`` is already buffered (``ack + 2 + i``)."""
        if not self._buffer:
            return 0
        mask = 0
        first = self.expected + 1
        for seq in self._buffer:
            i = seq - first
            if 0 <= i < SACK_BITS:
                mask |= 1 << i
        return mask

"""NetworkHealthMonitor: per-peer RTT, loss, retransmit and corruption rates over a sliding window.

Pure logic with an injected clock. Links record events; :meth:`NetworkHealthMonitor.snapshot` answers
for a health page, and :meth:`NetworkHealthMonitor.state` tells a slow peer from a dead one:

- DEAD: nothing heard from the peer for ``dead_after_s``;
- SLOW: heard, but heartbeats are late (``suspect_after_s``) or the recent median RTT is well above the
  peer's own baseline (``slow_rtt_factor`` times its minimum, and above ``slow_rtt_floor_s``);
- ALIVE otherwise; UNKNOWN before the first frame.

:meth:`NetworkHealthMonitor.suggest_timeout` turns the observed RTT tail into a timeout for waits on that
peer (barriers, steps), so deadlines follow the network rather than a constant.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class PeerState(enum.StrEnum):
    UNKNOWN = "unknown"
    ALIVE = "alive"
    SLOW = "slow"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class HealthConfig:
    window_s: float = 30.0
    buckets: int = 10
    dead_after_s: float = 5.0
    suspect_after_s: float = 2.0
    slow_rtt_factor: float = 4.0
    slow_rtt_floor_s: float = 0.05
    recent_rtt_samples: int = 16
    max_rtt_samples: int = 512
    timeout_multiplier: float = 4.0
    timeout_margin_s: float = 0.05
    min_timeout_s: float = 0.1
    max_timeout_s: float = 60.0
    default_timeout_s: float = 5.0


@dataclass(slots=True)
class _Bucket:
    start: float
    sent: int = 0
    received: int = 0
    retransmits: int = 0
    corrupt: int = 0


@dataclass(slots=True)
class _Peer:
    buckets: deque[_Bucket] = field(default_factory=deque)
    rtts: deque[tuple[float, float]] = field(default_factory=deque)
    rtt_min: float | None = None
    last_heard: float | None = None
    total_sent: int = 0
    total_received: int = 0
    total_retransmits: int = 0
    total_corrupt: int = 0


@dataclass(frozen=True, slots=True)
class PeerHealth:
    """One peer's health over the window (rates) and since start (totals)."""

    peer: str
    state: PeerState
    last_heard_age_s: float | None
    rtt_last_s: float | None
    rtt_min_s: float | None
    rtt_p50_s: float | None
    rtt_p99_s: float | None
    rtt_samples: int
    sent: int
    received: int
    retransmits: int
    corrupt: int
    loss_rate: float
    """Retransmitted over sent data frames in the window: the share presumed lost."""
    retransmit_rate_per_s: float
    corruption_rate: float
    """Corrupt over all frames received in the window."""
    suggested_timeout_s: float
    total_sent: int
    total_received: int
    total_retransmits: int
    total_corrupt: int


def _quantile(sorted_values: list[float], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


class NetworkHealthMonitor:
    def __init__(self, config: HealthConfig | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.config = config or HealthConfig()
        self._clock = clock
        self._peers: dict[str, _Peer] = {}

    def peers(self) -> list[str]:
        return list(self._peers)

    def forget(self, peer: str) -> None:
        self._peers.pop(peer, None)

    # -- recording -------------------------------------------------------------------------------------

    def _peer(self, peer: str) -> _Peer:
        p = self._peers.get(peer)
        if p is None:
            p = self._peers[peer] = _Peer()
        return p

    def _bucket(self, p: _Peer, now: float) -> _Bucket:
        width = self.config.window_s / self.config.buckets
        if not p.buckets or now >= p.buckets[-1].start + width:
            p.buckets.append(_Bucket(start=now))
            self._prune(p, now)
        return p.buckets[-1]

    def _prune(self, p: _Peer, now: float) -> None:
        horizon = now - self.config.window_s
        while p.buckets and p.buckets[0].start + self.config.window_s / self.config.buckets < horizon:
            p.buckets.popleft()
        while p.rtts and (p.rtts[0][0] < horizon or len(p.rtts) > self.config.max_rtt_samples):
            p.rtts.popleft()

    def record_sent(self, peer: str, n: int = 1) -> None:
        p = self._peer(peer)
        self._bucket(p, self._clock()).sent += n
        p.total_sent += n

    def record_received(self, peer: str, n: int = 1) -> None:
        """Frames that passed verification; receiving anything counts as hearing from the peer."""
        p = self._peer(peer)
        now = self._clock()
        self._bucket(p, now).received += n
        p.total_received += n
        p.last_heard = now

    def record_retransmit(self, peer: str, n: int = 1) -> None:
        p = self._peer(peer)
        self._bucket(p, self._clock()).retransmits += n
        p.total_retransmits += n

    def record_corrupt(self, peer: str, n: int = 1) -> None:
        p = self._peer(peer)
        self._bucket(p, self._clock()).corrupt += n
        p.total_corrupt += n

    def record_rtt(self, peer: str, rtt_s: float) -> None:
        if rtt_s < 0:
            return
        p = self._peer(peer)
        now = self._clock()
        p.rtts.append((now, rtt_s))
        p.last_heard = now
        p.rtt_min = rtt_s if p.rtt_min is None else min(p.rtt_min, rtt_s)
        if len(p.rtts) > self.config.max_rtt_samples:
            p.rtts.popleft()

    # -- judging ---------------------------------------------------------------------------------------

    def state(self, peer: str) -> PeerState:
        p = self._peers.get(peer)
        if p is None or p.last_heard is None:
            return PeerState.UNKNOWN
        now = self._clock()
        self._prune(p, now)
        age = now - p.last_heard
        cfg = self.config
        if age > cfg.dead_after_s:
            return PeerState.DEAD
        if age > cfg.suspect_after_s:
            return PeerState.SLOW
        recent = [r for _, r in list(p.rtts)[-cfg.recent_rtt_samples :]]
        if recent and p.rtt_min is not None:
            recent.sort()
            median = _quantile(recent, 0.5)
            if median > cfg.slow_rtt_floor_s and median > cfg.slow_rtt_factor * p.rtt_min:
                return PeerState.SLOW
        return PeerState.ALIVE

    def suggest_timeout(self, peer: str) -> float:
        """A deadline for one round trip's worth of waiting on ``peer``, from its observed RTT tail."""
        cfg = self.config
        p = self._peers.get(peer)
        if p is None or not p.rtts:
            return cfg.default_timeout_s
        values = sorted(r for _, r in p.rtts)
        p99 = _quantile(values, 0.99)
        return min(cfg.max_timeout_s, max(cfg.min_timeout_s, p99 * cfg.timeout_multiplier + cfg.timeout_margin_s))

    def snapshot(self, peer: str) -> PeerHealth:
        p = self._peer(peer)
        now = self._clock()
        self._prune(p, now)
        sent = sum(b.sent for b in p.buckets)
        received = sum(b.received for b in p.buckets)
        retransmits = sum(b.retransmits for b in p.buckets)
        corrupt = sum(b.corrupt for b in p.buckets)
        span = now - p.buckets[0].start if p.buckets else 0.0
        values = sorted(r for _, r in p.rtts)
        return PeerHealth(
            peer=peer,
            state=self.state(peer),
            last_heard_age_s=None if p.last_heard is None else now - p.last_heard,
            rtt_last_s=p.rtts[-1][1] if p.rtts else None,
            rtt_min_s=p.rtt_min,
            rtt_p50_s=_quantile(values, 0.5) if values else None,
            rtt_p99_s=_quantile(values, 0.99) if values else None,
            rtt_samples=len(values),
            sent=sent,
            received=received,
            retransmits=retransmits,
            corrupt=corrupt,
            loss_rate=retransmits / sent if sent else 0.0,
            retransmit_rate_per_s=retransmits / span if span > 0 else 0.0,
            corruption_rate=corrupt / (received + corrupt) if received + corrupt else 0.0,
            suggested_timeout_s=self.suggest_timeout(peer),
            total_sent=p.total_sent,
            total_received=p.total_received,
            total_retransmits=p.total_retransmits,
            total_corrupt=p.total_corrupt,
        )

    def snapshot_all(self) -> dict[str, PeerHealth]:
        return {peer: self.snapshot(peer) for peer in list(self._peers)}

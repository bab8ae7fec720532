"""What a peer link is set up with and what it reports: :class:`LinkConfig` (windows, timers, frame limit,
fault injection), :class:`LinkStats` (one link's counters), :class:`PeerStatistics` and
:class:`PeersStatistics` (every link of a node, per peer) and :class:`LinkClosed`. Pure data, no IO; the
link itself is :class:`~exo_stable.wire.peerlink.PeerLink`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from aiohttp import web

from exo_stable.wire.faults import FaultConfig

WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
DEFAULT_MAX_FRAME_BYTES: Final = (4 << 20) + (64 << 10)
"""4 MiB of payload plus room for the header: a 1 MiB activation chunk fits with ample margin."""
WIRE_PATH: Final = "/exo-stable/wire"


@dataclass(frozen=True, slots=True)
class LinkConfig:
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    checksum: bool = True
    window: int = 256
    window_bytes: int = 32 << 20
    inbox_size: int = 1024
    ack_every: int = 16
    ack_delay_s: float = 0.002
    initial_rto_s: float = 0.2
    min_rto_s: float = 0.05
    max_rto_s: float = 2.0
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    handshake_timeout_s: float = 5.0
    close_timeout_s: float = 2.0
    reconnect_initial_s: float = 0.02
    reconnect_max_s: float = 2.0
    reorder_flush_s: float = 0.005
    faults: FaultConfig | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> LinkConfig:
        """Defaults plus ``overrides``, with faults from ``EXO_STABLE_FAULTS`` (whole-node fault runs)."""
        overrides.setdefault("faults", FaultConfig.from_env(environ))
        return cls(**overrides)


class LinkClosed(ConnectionError):
    """The link was closed; it sends and receives nothing more."""


@dataclass(frozen=True, slots=True)
class LinkStats:
    """A snapshot of one link (``PeerLink.statistics()``)."""

    local: str
    peer: str | None
    connected: bool
    connects: int
    disconnects: int
    connect_failures: int
    last_error: str
    messages_sent: int
    messages_acked: int
    messages_delivered: int
    in_flight: int
    frames_sent: int
    frames_received: int
    retransmissions: int
    fast_retransmissions: int
    timeout_retransmissions: int
    duplicates_suppressed: int
    reordered: int
    out_of_window: int
    corrupt_frames: int
    bad_frames_by_reason: dict[str, int]
    undecodable: int
    peer_restarts: int
    rtt_s: float | None
    rto_s: float
    faults: dict[str, int] | None
    bytes_sent: int = 0
    """Frame bytes written to the socket (data, acks, heartbeats, retransmissions; handshakes aside)."""
    bytes_received: int = 0
    """Frame bytes read from the socket (before fault injection), bad frames included."""

    def as_dict(self) -> dict[str, object]:
        """The link's integrity counters as ``/health`` shows them."""
        return {
            "connected": self.connected,
            "rtt_ms": None if self.rtt_s is None else round(1000 * self.rtt_s, 3),
            "retransmissions": self.retransmissions,
            "duplicates_suppressed": self.duplicates_suppressed,
            "corrupt_frames": self.corrupt_frames,
            "faults_injected": self.faults,
        }


@dataclass(frozen=True, slots=True)
class PeerStatistics:
    """One peer of a node: whether it is up, its health state and each of its links (``out``: dialed by
    this node, ``in``: dialed by the peer)."""

    node_id: str
    up: bool
    health: str
    links: Mapping[str, LinkStats]

    def as_dict(self) -> dict[str, object]:
        return {"up": self.up, "health": self.health, "links": {d: st.as_dict() for d, st in self.links.items()}}


@dataclass(frozen=True, slots=True)
class PeersStatistics:
    """Every peer of a node (``PeerManager.statistics()``), and the connections it refused."""

    peers: tuple[PeerStatistics, ...] = ()
    handshakes_refused: Mapping[str, int] = field(default_factory=dict)
    """Incoming connections refused before a link existed, by reason."""
    refused: Mapping[str, str] = field(default_factory=dict)
    """Peers whose links this node closed (another model), with the reason."""

    def connected(self) -> list[str]:
        return [p.node_id for p in self.peers if p.up]

    def links(self) -> list[tuple[str, str, LinkStats]]:
        """(peer, direction, the link's counters) for every link."""
        return [(p.node_id, d, st) for p in self.peers for d, st in p.links.items()]

    def health(self, node_id: str) -> str | None:
        return next((p.health for p in self.peers if p.node_id == node_id), None)

    def as_dict(self) -> dict[str, object]:
        return {p.node_id: p.as_dict() for p in self.peers}

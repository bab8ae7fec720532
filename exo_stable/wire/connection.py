"""One websocket connection of a :class:`~exo_stable.wire.peerlink.PeerLink`: its state (:class:`Connection`)
and the decisions the link's writer takes about it on each turn: the ping and pong frames due now
(:func:`control_frames`) and when the writer must wake next (:func:`wake_at`). No IO: the link's reader and
writer tasks do the socket work; :class:`ConnectionEnded` is how either of them ends the connection.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from exo_stable.wire.frame import FrameCodec, FrameKind, encode_ping
from exo_stable.wire.handshake import PeerInfo
from exo_stable.wire.linkconfig import WebSocket


class ConnectionEnded(Exception):
    """Raised by a connection task to end the connection (not an error of the link)."""


@dataclass(slots=True)
class Connection:
    ws: WebSocket
    peer: PeerInfo
    last_rx: float
    next_ping: float
    ping_id: int = 0
    delivering: bool = False
    stopping: str = ""
    pongs: list[bytes] = field(default_factory=list)
    ping_requests: list[asyncio.Future[float]] = field(default_factory=list)
    ping_waiters: dict[int, asyncio.Future[float]] = field(default_factory=dict)
    last_turn: float | None = None  # when the writer last looked at the connection
    graced_rx: float | None = None  # last_rx as set by the last grace (nothing heard since, when unchanged)
    stall_graces: int = 0


def peer_silent(conn: Connection, now: float, heartbeat_timeout_s: float, heartbeat_interval_s: float) -> bool:
    """Whether the peer has been silent past ``heartbeat_timeout_s``. The writer looks at least once per
    heartbeat interval; when this turn comes much later than that, this node's own event loop was stalled
    (a long synchronous call, a starved process) and the peer's frames may be waiting unread in the socket.
    If the peer was within its limit when this node stopped looking, the verdict waits one more interval
    (once: a peer still silent after it is gone), so that a node that stalled does not drop live peers."""
    previous, conn.last_turn = conn.last_turn, now
    if conn.delivering or now - conn.last_rx <= heartbeat_timeout_s:
        return False
    stalled = previous is not None and now - previous > 1.5 * heartbeat_interval_s
    alive_then = previous is not None and previous - conn.last_rx <= heartbeat_timeout_s
    if stalled and alive_then and conn.graced_rx != conn.last_rx:
        conn.stall_graces += 1
        conn.last_rx = conn.graced_rx = now - heartbeat_timeout_s + heartbeat_interval_s
        return False
    return True


def control_frames(conn: Connection, codec: FrameCodec, now: float, heartbeat_interval_s: float) -> list[bytes]:
    """The PONGs owed, a PING per ``ping()`` caller (its future now waits on that ping's id) and the heartbeat
    PING once it is due; ``conn`` records what was taken."""
    frames: list[bytes] = []
    if conn.pongs:
        frames.extend(codec.encode(FrameKind.PONG, p) for p in conn.pongs)
        conn.pongs.clear()
    for fut in conn.ping_requests:
        conn.ping_id += 1
        conn.ping_waiters[conn.ping_id] = fut
        frames.append(codec.encode(FrameKind.PING, encode_ping(conn.ping_id, now)))
    conn.ping_requests.clear()
    if now >= conn.next_ping:
        conn.ping_id += 1
        frames.append(codec.encode(FrameKind.PING, encode_ping(conn.ping_id, now)))
        conn.next_ping = now + heartbeat_interval_s
    return frames


def wake_at(conn: Connection, heartbeat_timeout_s: float, rto_deadline: float | None, ack_due: float | None) -> float:
    """The earliest timer of the connection: the next heartbeat, the peer's silence limit, the earliest
    retransmission (``rto_deadline``) and a delayed ack (``ack_due``; None when no ack is pending)."""
    deadline = min(conn.next_ping, conn.last_rx + heartbeat_timeout_s)
    if rto_deadline is not None:
        deadline = min(deadline, rto_deadline)
    if ack_due is not None:
        deadline = min(deadline, ack_due)
    return deadline

"""PeerLink: one reliable, checksummed, ordered message link to one peer over an aiohttp websocket.

A link is either *dialing* (it has the peer's URL, connects, and reconnects with backoff after a drop) or
*accepting* (a :class:`~exo_stable.wire.server.WireServer` hands it each incoming connection after the
handshake). Its state outlives connections: the send window keeps every unacknowledged message and the
receive window remembers what was delivered, so after a reconnect everything unacknowledged is resent and
duplicates are suppressed: the receiver sees each message exactly once, in order.

Per connection two tasks run in a TaskGroup: the reader (socket → fault injector → frame check → windows →
inbox) and the writer (the only task that writes: new data, retransmissions, acks, heartbeats; it sleeps on
an event with a deadline set by the earliest timer). Either ends the connection by raising
``ConnectionEnded`` (see ``connection.py``); the other is cancelled, the socket closed with a deadline.

aiohttp settings are deliberate: ``max_msg_size`` is the link's ``max_frame_bytes`` (larger tensors are
chunked, see ``tensors.py``), compression is off (activations barely compress; it costs CPU), and aiohttp's
own heartbeat is off because the link runs its own: checksummed PING/PONG frames that measure RTT and feed
the health monitor, so one judge decides when a peer is dead.

The link's settings and statistics are in ``linkconfig.py``, the handshake frame helpers it shares with the
server in ``wsio.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable

import aiohttp
import msgspec

from exo_stable.wire.connection import Connection, ConnectionEnded, control_frames, peer_silent, wake_at
from exo_stable.wire.faults import FaultCounts, FaultInjector
from exo_stable.wire.frame import (
    Frame,
    FrameCodec,
    FrameError,
    FrameKind,
    FrameTooLarge,
    decode_ping,
)
from exo_stable.wire.handshake import Dialer, HandshakeError, Identity, PeerInfo
from exo_stable.wire.health import NetworkHealthMonitor
from exo_stable.wire.linkconfig import (
    DEFAULT_MAX_FRAME_BYTES,
    WIRE_PATH,
    LinkClosed,
    LinkConfig,
    LinkStats,
    WebSocket,
)
from exo_stable.wire.messages import CODEC, Challenge, Message, Rejected, Welcome
from exo_stable.wire.reliable import ReceiveWindow, RttEstimator, SendWindow
from exo_stable.wire.wsio import close_ws, recv_handshake, send_handshake

log = logging.getLogger("exo_stable.wire")


class PeerLink:
    """Reliable ordered delivery of :data:`Message` to one peer. Use ``async with`` or start()/close()."""

    def __init__(
        self,
        identity: Identity,
        *,
        url: str | None = None,
        peer_id: str | None = None,
        secret: bytes | None = None,
        config: LinkConfig | None = None,
        monitor: NetworkHealthMonitor | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self.url = url
        self.peer_id = peer_id
        self.config = cfg = config or LinkConfig()
        self.monitor = monitor or NetworkHealthMonitor(clock=clock)
        self._secret = secret
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self._codec = FrameCodec(max_frame_bytes=cfg.max_frame_bytes, checksum=cfg.checksum)
        rtt = RttEstimator(initial_rto=cfg.initial_rto_s, min_rto=cfg.min_rto_s, max_rto=cfg.max_rto_s)
        self._tx = SendWindow(window=cfg.window, window_bytes=cfg.window_bytes, rtt=rtt)
        self._rx = ReceiveWindow(window=cfg.window)
        self._inbox: asyncio.Queue[Message] = asyncio.Queue(maxsize=cfg.inbox_size)
        self._injector: FaultInjector | None = None
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()  # replaced and set whenever the send window moves
        self._connected = asyncio.Event()
        self._closed_event = asyncio.Event()
        self._conn_lock = asyncio.Lock()
        self._active: Connection | None = None
        self._root: asyncio.Task[None] | None = None
        self._closing = False
        self._peer_session: tuple[str, str] | None = None  # the peer's (session, link) of the last connection
        self.link_id = secrets.token_hex(8)
        self.peer: PeerInfo | None = None
        self._ack_pending = 0
        self._ack_urgent = False
        self._ack_due = 0.0
        # counters
        self._connects = 0
        self._disconnects = 0
        self._connect_failures = 0
        self._last_error = ""
        self._frames_sent = 0
        self._frames_received = 0
        self._bytes_sent = 0
        self._bytes_received = 0
        self._bad_frames: dict[str, int] = {}
        self._undecodable = 0
        self._peer_restarts = 0
        self._delivered = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    async def __aenter__(self) -> PeerLink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._root is not None or self._closing:
            raise RuntimeError("PeerLink already started or closed")
        if self.url is not None:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            self._root = asyncio.create_task(self._main(), name=f"peerlink[{self.identity.node_id}->{self.url}]")

    async def close(self) -> None:
        """Stop the link: end the connection and reconnecting; pending sends and waits raise LinkClosed."""
        if self._closing:
            return
        self._closing = True
        self._closed_event.set()
        self._wake.set()
        self._signal_progress()
        try:
            if self._root is not None:
                try:
                    async with asyncio.timeout(self.config.close_timeout_s * 2):
                        await asyncio.shield(self._root)
                except TimeoutError:
                    log.warning("%s: link did not stop in time; cancelling", self._name)
                    self._root.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._root
            else:
                # An accepting link: wait for the connection served by the WireServer to finish.
                async with asyncio.timeout(self.config.close_timeout_s * 2), self._conn_lock:
                    pass
        finally:
            if self._own_session and self._session is not None:
                await self._session.close()

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def connected(self) -> bool:
        return self._active is not None and self._connected.is_set()

    @property
    def _name(self) -> str:
        return f"link {self.identity.node_id}->{self.peer_id or self.url}"

    async def wait_connected(self, timeout: float) -> PeerInfo:  # noqa: ASYNC109 (deadline is mandatory)
        async with asyncio.timeout(timeout):
            await self._connected.wait()
        if self.peer is None:
            raise LinkClosed("link closed before connecting")
        return self.peer

    async def wait_disconnected(self, timeout: float) -> None:  # noqa: ASYNC109 (deadline is mandatory)
        """Wait until the current connection (if any) has ended."""
        async with asyncio.timeout(timeout):
            while self.connected:
                await self._progress.wait()

    async def ping(self, timeout: float) -> float:  # noqa: ASYNC109 (deadline is mandatory)
        """Send a heartbeat now and return the measured round-trip time in seconds."""
        conn = self._active
        if conn is None:
            raise ConnectionError(f"{self._name} is not connected")
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        conn.ping_requests.append(fut)
        self._wake.set()
        async with asyncio.timeout(timeout):
            return await fut

    # -- the application's side ------------------------------------------------------------------------

    async def send(self, message: Message, *, timeout: float) -> int:  # noqa: ASYNC109 (deadline is mandatory)
        """Queue ``message`` in the send window; returns its link sequence number.

        Waits (at most ``timeout`` s, then ``TimeoutError``) while the window is full: back-pressure.
        Raises ``FrameTooLarge`` for a message that cannot fit one frame (chunk it) and ``LinkClosed``.
        """
        payload = CODEC.encode(message)
        if len(payload) > self._codec.max_payload_bytes:
            raise FrameTooLarge(
                f"{type(message).__name__} of {len(payload)} bytes exceeds the frame payload limit "
                f"of {self._codec.max_payload_bytes}; chunk it"
            )
        async with asyncio.timeout(timeout):
            while True:
                if self._closing:
                    raise LinkClosed(f"{self._name} is closed")
                if self._tx.has_space(len(payload)):
                    break
                await self._progress.wait()
        seq = self._tx.push(payload)
        self._wake.set()
        return seq

    async def wait_acked(self, timeout: float, *, seq: int | None = None) -> None:  # noqa: ASYNC109 (deadline is mandatory)
        """Wait until the peer acknowledged ``seq`` (default: everything sent so far). Flush."""
        target = self._tx.next_seq - 1 if seq is None else seq
        async with asyncio.timeout(timeout):
            while self._tx.base <= target:
                if self._closing:
                    raise LinkClosed(f"{self._name} closed with {self._tx.in_flight} messages unacknowledged")
                await self._progress.wait()

    flush = wait_acked

    async def recv(self, timeout: float) -> Message:  # noqa: ASYNC109 (deadline is mandatory)
        """The next delivered message, in order; ``TimeoutError`` after ``timeout`` s."""
        async with asyncio.timeout(timeout):
            return await self._inbox.get()

    def recv_nowait(self) -> Message | None:
        try:
            return self._inbox.get_nowait()
        except asyncio.QueueEmpty:
            return None

    @property
    def tx_base(self) -> int:
        return self._tx.base

    @property
    def fault_counts(self) -> FaultCounts | None:
        return None if self._injector is None else self._injector.counts

    def statistics(self) -> LinkStats:
        tx, rx = self._tx.stats, self._rx.stats
        return LinkStats(
            local=self.identity.node_id,
            peer=self.peer_id,
            connected=self.connected,
            connects=self._connects,
            disconnects=self._disconnects,
            connect_failures=self._connect_failures,
            last_error=self._last_error,
            messages_sent=tx.pushed,
            messages_acked=tx.acked,
            messages_delivered=self._delivered,
            in_flight=self._tx.in_flight,
            frames_sent=self._frames_sent,
            frames_received=self._frames_received,
            retransmissions=tx.retransmissions,
            fast_retransmissions=tx.fast_retransmissions,
            timeout_retransmissions=tx.timeout_retransmissions,
            duplicates_suppressed=rx.duplicates,
            reordered=rx.reordered,
            out_of_window=rx.out_of_window,
            corrupt_frames=sum(self._bad_frames.values()),
            bad_frames_by_reason=dict(self._bad_frames),
            undecodable=self._undecodable,
            peer_restarts=self._peer_restarts,
            rtt_s=self._tx.rtt.srtt,
            rto_s=self._tx.rtt.rto(),
            faults=None if self._injector is None else self._injector.counts.as_dict(),
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
        )

    # -- dialing ---------------------------------------------------------------------------------------

    async def _main(self) -> None:
        backoff = self.config.reconnect_initial_s
        while not self._closing:
            established = False
            try:
                established = await self._dial_once()
            except (aiohttp.ClientError, OSError, HandshakeError, TimeoutError) as exc:
                self._connect_failures += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: connect failed: %s", self._name, self._last_error)
            if self._closing:
                break
            backoff = self.config.reconnect_initial_s if established else min(self.config.reconnect_max_s, backoff * 2)
            delay = backoff * random.uniform(0.5, 1.0)
            try:
                async with asyncio.timeout(delay):
                    await self._closed_event.wait()
            except TimeoutError:
                pass  # the backoff elapsed: try again

    async def _dial_once(self) -> bool:
        assert self._session is not None and self.url is not None
        cfg = self.config
        async with asyncio.timeout(cfg.handshake_timeout_s):
            ws = await self._session.ws_connect(
                self.url,
                max_msg_size=cfg.max_frame_bytes,
                heartbeat=None,
                compress=0,
                autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=cfg.close_timeout_s),
            )
        try:
            dialer = Dialer(self.identity, self._secret, expected_peer=self.peer_id, link_id=self.link_id)
            try:
                async with asyncio.timeout(cfg.handshake_timeout_s):
                    await send_handshake(ws, self._codec, dialer.hello(self._tx.base))
                    challenge = await recv_handshake(ws, self._codec, Challenge)
                    try:
                        auth = dialer.on_challenge(challenge)
                    except HandshakeError as exc:
                        await send_handshake(ws, self._codec, Rejected(reason=exc.reason))
                        raise
                    await send_handshake(ws, self._codec, auth)
                    welcome = await recv_handshake(ws, self._codec, Welcome)
                    try:
                        info = dialer.on_welcome(welcome)
                    except HandshakeError as exc:
                        await send_handshake(ws, self._codec, Rejected(reason=exc.reason))
                        raise
            except TimeoutError as exc:
                raise HandshakeError("handshake timed out") from exc
            if self.peer_id is None:
                self.peer_id = info.node_id
            await self.serve(ws, info)
            return True
        finally:
            await close_ws(ws, self.config.close_timeout_s)

    # -- one connection --------------------------------------------------------------------------------

    async def serve(self, ws: WebSocket, info: PeerInfo) -> None:
        """Run the link over ``ws`` (handshake already done) until the connection ends or the link closes."""
        if self._closing:
            return
        if self._active is not None:
            self._active.stopping = "replaced by a newer connection"
            self._wake.set()
        async with asyncio.timeout(self.config.close_timeout_s * 2):
            await self._conn_lock.acquire()
        try:
            if self._closing:
                return
            now = self._clock()
            conn = Connection(ws=ws, peer=info, last_rx=now, next_ping=now)
            self._attach(conn)
            reason = "?"
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._reader(conn), name=f"{self._name} reader")
                    tg.create_task(self._writer(conn), name=f"{self._name} writer")
            except* ConnectionEnded as group:
                reason = str(group.exceptions[0])
            except* (ConnectionError, aiohttp.ClientError) as group:
                reason = f"socket error: {group.exceptions[0]!r}"
            finally:
                self._detach()
            log.info("%s: connection ended: %s", self._name, reason)
            if not self._closing:
                self._last_error = reason
        finally:
            self._conn_lock.release()

    def _attach(self, conn: Connection) -> None:
        info = conn.peer
        if self.peer_id is None:
            self.peer_id = info.node_id
        forget = (info.session_id, info.link_id) != self._peer_session
        if forget:
            if self._peer_session is not None:
                self._peer_restarts += 1
                log.warning(
                    "%s: peer restarted (new session %s); resetting receive state",
                    self._name,
                    info.session_id,
                )
            self._rx.reset(info.tx_base)
            self._peer_session = (info.session_id, info.link_id)
        self._tx.requeue_all(forget_sacks=forget)
        if self._injector is None and self.config.faults is not None and self.config.faults.active:
            self._injector = FaultInjector(self.config.faults, stream=f"{info.node_id}->{self.identity.node_id}")
        self.peer = info
        self._active = conn
        self._connects += 1
        self._ack_urgent = True
        self._wake.set()
        self._connected.set()
        log.info("%s: connected to %s (session %s)", self._name, info.node_id, info.session_id)

    def _detach(self) -> None:
        conn = self._active
        if conn is not None:
            for fut in [*conn.ping_requests, *conn.ping_waiters.values()]:
                if not fut.done():
                    fut.set_exception(ConnectionError("the connection ended before the pong"))
        self._active = None
        self._connected.clear()
        self._disconnects += 1
        if self._injector is not None:
            self._injector.discard()
        self._signal_progress()

    def _signal_progress(self) -> None:
        ev = self._progress
        self._progress = asyncio.Event()
        ev.set()

    async def _reader(self, conn: Connection) -> None:
        cfg = self.config
        ws = conn.ws
        injector = self._injector
        while True:
            holding = injector is not None and injector.holding > 0
            try:
                msg = await ws.receive(timeout=cfg.reorder_flush_s if holding else cfg.heartbeat_timeout_s)
            except TimeoutError:
                if injector is not None and injector.holding:
                    for raw in injector.flush():
                        await self._on_frame(conn, raw)
                continue  # silence is judged by the writer's heartbeat check
            if msg.type is aiohttp.WSMsgType.BINARY:
                data: bytes = msg.data
                self._bytes_received += len(data)
                if injector is None:
                    await self._on_frame(conn, data)
                    continue
                outcome = injector.process(data)
                if outcome.delay:
                    await asyncio.sleep(outcome.delay)  # simulated network latency
                for raw in outcome.frames:
                    await self._on_frame(conn, raw)
                if outcome.cut:
                    raise ConnectionEnded("fault injector cut the connection")
            elif msg.type is aiohttp.WSMsgType.TEXT:
                self._count_bad("text_frame")
                log.warning("%s: dropped a text frame (only binary frames are valid)", self._name)
            elif msg.type is aiohttp.WSMsgType.ERROR:
                self._count_bad("ws_error")
                log.warning("%s: websocket error: %r", self._name, msg.data)
                raise ConnectionEnded(f"websocket error: {msg.data!r}")
            else:
                raise ConnectionEnded(f"closed by peer ({msg.type.name}, code {ws.close_code})")

    def _count_bad(self, reason: str) -> None:
        self._bad_frames[reason] = self._bad_frames.get(reason, 0) + 1
        if self.peer_id is not None:
            self.monitor.record_corrupt(self.peer_id)

    async def _on_frame(self, conn: Connection, raw: bytes) -> None:
        try:
            frame = self._codec.decode(raw)
        except FrameError as exc:
            self._count_bad(exc.reason)
            log.debug("%s: dropped bad frame (%s): %s", self._name, exc.reason, exc)
            return
        now = self._clock()
        conn.last_rx = now
        self._frames_received += 1
        peer = conn.peer.node_id
        self.monitor.record_received(peer)
        kind = frame.kind
        if kind is FrameKind.DATA or kind is FrameKind.ACK:
            if self._tx.on_ack(frame.ack, frame.sack, now):
                self._signal_progress()
            if self._tx.has_queued():
                self._wake.set()
            if kind is FrameKind.DATA:
                await self._on_data(conn, frame)
        elif kind is FrameKind.PING:
            conn.pongs.append(frame.payload)
            self._wake.set()
        elif kind is FrameKind.PONG:
            try:
                ping_id, sent_at = decode_ping(frame.payload)
            except FrameError as exc:
                self._count_bad(exc.reason)
                return
            rtt = now - sent_at
            self.monitor.record_rtt(peer, rtt)
            waiter = conn.ping_waiters.pop(ping_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(rtt)
        else:
            self._count_bad("unexpected_handshake")
            log.warning("%s: handshake frame on an established link ignored", self._name)

    async def _on_data(self, conn: Connection, frame: Frame) -> None:
        before = self._rx.stats.duplicates
        delivered = self._rx.on_data(frame.seq, frame.payload)
        self._ack_pending += 1
        if not delivered or self._rx.stats.duplicates != before:
            self._ack_urgent = True  # a gap or a duplicate: tell the sender now
        if self._ack_pending == 1:
            self._ack_due = self._clock() + self.config.ack_delay_s
        if self._ack_urgent or self._ack_pending == 1 or self._ack_pending >= self.config.ack_every:
            self._wake.set()  # the first pending ack sets the writer's deadline (else it sleeps to the next ping)
        for payload in delivered:
            try:
                message = CODEC.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._undecodable += 1
                log.error("%s: undecodable message (checksum ok: a peer bug or schema skew): %s", self._name, exc)
                continue
            if self._inbox.full():
                conn.delivering = True
                try:
                    await self._inbox.put(message)  # back-pressure: the window fills, the sender waits
                finally:
                    conn.delivering = False
                    conn.last_rx = self._clock()
            else:
                self._inbox.put_nowait(message)
            self._delivered += 1

    async def _writer(self, conn: Connection) -> None:
        cfg = self.config
        codec = self._codec
        ws = conn.ws
        peer = conn.peer.node_id
        tx, rx = self._tx, self._rx
        while True:
            self._wake.clear()
            if self._closing:
                raise ConnectionEnded("link closed")
            if conn.stopping:
                raise ConnectionEnded(conn.stopping)
            now = self._clock()
            if peer_silent(conn, now, cfg.heartbeat_timeout_s, cfg.heartbeat_interval_s):
                raise ConnectionEnded(f"peer silent for {now - conn.last_rx:.2f}s (heartbeat timeout)")
            frames: list[bytes] = []
            sends = tx.poll(now)
            if sends:
                ack, sack = rx.ack, rx.sack()
                retransmits = 0
                for t in sends:
                    frames.append(codec.encode(FrameKind.DATA, t.payload, seq=t.seq, ack=ack, sack=sack))
                    retransmits += t.retransmit
                self.monitor.record_sent(peer, len(sends))
                if retransmits:
                    self.monitor.record_retransmit(peer, retransmits)
                self._ack_pending = 0
                self._ack_urgent = False
            elif self._ack_urgent or (
                self._ack_pending and (self._ack_pending >= cfg.ack_every or now >= self._ack_due)
            ):
                frames.append(codec.encode(FrameKind.ACK, ack=rx.ack, sack=rx.sack()))
                self._ack_pending = 0
                self._ack_urgent = False
            frames.extend(control_frames(conn, codec, now, cfg.heartbeat_interval_s))
            for f in frames:
                await ws.send_bytes(f)
                self._bytes_sent += len(f)
            self._frames_sent += len(frames)
            if self._wake.is_set():
                continue
            ack_due = self._ack_due if self._ack_pending else None
            wait = wake_at(conn, cfg.heartbeat_timeout_s, tx.next_deadline(), ack_due) - self._clock()
            if wait <= 0:
                continue
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass  # a timer is due: loop around and act on it


__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "WIRE_PATH",
    "LinkClosed",
    "LinkConfig",
    "LinkStats",
    "PeerLink",
    "WebSocket",
    "close_ws",
    "recv_handshake",
    "send_handshake",
]
